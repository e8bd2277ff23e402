"""scripts/gpu_check.sh, gpu_check.py and gpu_bundle.sh: usage and bad arguments, the first command's
stash, and the second command's join + checksum + offline install from a bundle laid out as
scripts/gpu_bundle.sh lays it out (a small stand-in wheel split in two parts, one per transfer).
The whole procedure on CPU is tests/integration/test_gpu_check_rehearsal.py."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/tmp")}


def copy_scripts(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check.py", "gpu_bundle.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts")
    return tmp_path


def sh(script: Path, *args, cwd=None, timeout=120):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=timeout)


def test_help_prints_usage_and_does_nothing_else(tmp_path):
    root = copy_scripts(tmp_path)
    for script in ("gpu_check.sh", "gpu_bundle.sh"):
        result = sh(root / "scripts" / script, "--help")
        assert result.returncode == 0 and result.stdout.splitlines()[0].strip() and result.stderr == ""
        assert "Usage" in result.stdout and "set -u" not in result.stdout
    assert sorted(p.name for p in root.iterdir()) == ["scripts"]          # no gpu-check/, no bundle
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "tokens EXPORT QUESTIONS" in result.stdout


@pytest.mark.parametrize("args, says", [
    (["--bogus"], "unknown option --bogus"),
    (["--deadline", "soon"], "--deadline must be a whole number of seconds, got soon"),
    (["--steps", "shapes,warp"], "--steps takes shapes,jit,medium,decode,7b; got warp"),
    (["a", "b"], "one OUT_DIR expected, got a and b"),
    (["--bundle"], "--bundle needs a value"),
])
def test_bad_arguments_are_one_line(tmp_path, args, says):
    result = sh(copy_scripts(tmp_path) / "scripts/gpu_check.sh", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr


def test_bad_arguments_of_the_bundle_and_the_python_half_are_one_line(tmp_path):
    bundle = sh(copy_scripts(tmp_path) / "scripts/gpu_bundle.sh", "--python-version", "three")
    assert bundle.returncode == 2 and bundle.stderr.count("\n") == 1 and "--python-version" in bundle.stderr
    for args in (["tokens"], ["jit", "export", "first"], ["warp"]):
        py = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), *args], capture_output=True,
                            text=True, timeout=120)
        assert py.returncode == 2 and py.stderr.count("\n") == 1 and "bad arguments" in py.stderr


def fake_bundle(root: Path) -> bytes:
    """gpu_bundle.sh's layout around a small wheel: part 1 in 1/, the rest and SHA256SUMS in 2/."""
    wheel = root / "demo_pkg-1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg/__init__.py", "VALUE = 7\n")
        z.writestr("demo_pkg/big.bin", bytes(range(256)) * 4000)
        z.writestr("demo_pkg-1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo_pkg\nVersion: 1.2\n")
        z.writestr("demo_pkg-1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("demo_pkg-1.2.dist-info/RECORD", "")
    data = wheel.read_bytes()
    wheel.unlink()
    (root / "gpu-bundle/1").mkdir(parents=True)
    (root / "gpu-bundle/2").mkdir()
    half = len(data) // 2
    part1 = root / f"gpu-bundle/1/{wheel.name}.part-aa"
    part1.write_bytes(data[:half])
    (root / f"gpu-bundle/2/{wheel.name}.part-ab").write_bytes(data[half:])
    (root / "gpu-bundle/1/SHA256SUMS.part1").write_text(f"{hashlib.sha256(data[:half]).hexdigest()}  {part1.name}\n")
    (root / "gpu-bundle/2/SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {wheel.name}\n")
    return data


def test_two_commands_stash_join_verify_and_install_offline(tmp_path):
    root = copy_scripts(tmp_path / "tree1")
    data = fake_bundle(root)
    stash = tmp_path / "stash"
    first = sh(root / "scripts/gpu_check.sh", "--stash", "--stash-dir", str(stash))
    assert "stash: part 1 in" in first.stdout and "checksum ok" in first.stdout, first.stdout + first.stderr
    assert f"python {sys.version.split()[0]}" in first.stdout and "setuptools" in first.stdout
    # the second command runs in a fresh work tree that holds only part 2
    root2 = copy_scripts(tmp_path / "tree2")
    shutil.copytree(root / "gpu-bundle/2", root2 / "gpu-bundle/2")
    second = sh(root2 / "scripts/gpu_check.sh", "--stash-dir", str(stash), "--deadline", "0", str(root2 / "out"))
    summary = (root2 / "out/summary.txt").read_text()
    assert "install: joined demo_pkg-1.2-py3-none-any.whl" in summary, second.stdout + second.stderr
    assert "step install: exit 0" in summary
    assert (root2 / "out/wheels/demo_pkg-1.2-py3-none-any.whl").read_bytes() == data
    assert (root2 / "out/site/demo_pkg/__init__.py").read_text() == "VALUE = 7\n"    # --target install
    assert "step env: not run" in summary and "step shapes-export: not run" in summary   # deadline kept


def test_a_damaged_part_is_refused(tmp_path):
    root = copy_scripts(tmp_path / "tree")
    fake_bundle(root)
    part = next((root / "gpu-bundle/2").glob("*.part-ab"))
    damaged = bytearray(part.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    part.write_bytes(bytes(damaged))
    result = sh(root / "scripts/gpu_check.sh", "--stash-dir", str(tmp_path / "stash"), "--deadline", "0",
                str(root / "out"))
    summary = (root / "out/summary.txt").read_text()
    assert "step install: exit 1" in summary and "TensorRT-RTX is not installed" in summary, result.stdout
    assert not (root / "out/site").exists()
    # and without the first command's part 1 the second says what to do
    shutil.rmtree(tmp_path / "stash", ignore_errors=True)
    shutil.rmtree(root / "gpu-bundle/1")
    sh(root / "scripts/gpu_check.sh", "--stash-dir", str(tmp_path / "stash"), "--deadline", "0", str(root / "out"))
    assert "run the first command (--stash) again" in (root / "out/summary.txt").read_text()


def test_wheels_are_not_tracked():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "scripts/wheels", "gpu-bundle"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    assert tracked == ""
    ignored = subprocess.run(["git", "check-ignore", "gpu-bundle/1/x", "scripts/wheels/x"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == ["gpu-bundle/1/x", "scripts/wheels/x"]
