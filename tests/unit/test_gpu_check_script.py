"""scripts/gpu_check.sh stays runnable (its GPU steps run only where a GPU is lent): the shell parses,
the Python half prints its usage, and, in a copy with a wheel split in two parts beside it and a
deadline already reached, the parts are joined back into the wheel's own file name and every step is
reported as not run."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shell_parses_and_python_half_prints_usage():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")]).returncode == 0
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "tokens EXPORT_DIR QUESTIONS_JSONL" in result.stdout


def test_split_wheel_is_joined_and_the_deadline_is_kept(tmp_path):
    (tmp_path / "scripts" / "wheels").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/gpu_check.sh", tmp_path / "scripts")
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg-1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        z.writestr("demo_pkg/big.bin", bytes(range(256)) * 4000)
    data = wheel.read_bytes()
    half = len(data) // 2
    (tmp_path / "scripts/wheels/demo_pkg.whl.part-aa").write_bytes(data[:half])
    (tmp_path / "scripts/wheels/demo_pkg.whl.part-ab").write_bytes(data[half:])
    result = subprocess.run(["bash", str(tmp_path / "scripts/gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DEADLINE": "0"})
    assert (tmp_path / "scripts/wheels/demo_pkg-1.2-py3-none-any.whl").read_bytes() == data, result.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "joined 2 parts into demo_pkg-1.2-py3-none-any.whl" in summary
    assert "step install: not run" in summary and "step 7b-time: not run" in summary
