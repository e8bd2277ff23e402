"""Reproduce the 7B engine figures of docs/PERFORMANCE.md ("TensorRT-RTX engines of a 7B export",
issue 34) in one command: a random-weight LLaVA-1.5-7B-dims checkpoint, its fp16 HiMAP export, the
TensorRT-RTX build for an RTX target, and per step the wall time and peak RSS; then every engine's
bytes beside its weights (from the engines manifest).

Each step runs as its own process under a memory watchdog: ``/proc/<pid>/status`` is sampled every
0.5 s (VmHWM, RssAnon, RssFile) and the step is killed (exit 1, saying so) if its resident set
passes ``--rss-limit-gib``, so a build that would exhaust a shared machine stops before the kernel's
OOM killer picks a victim. The peak is VmHWM, what ``/usr/bin/time -v`` reports as "Maximum resident
set size".

Usage::

    python benchmarks/engines_7b.py --work /work/big/e7b                      # 32 layers, SM89, batch 1
    python benchmarks/engines_7b.py --work /tmp/e7b --layers 8 --keep          # smaller; keep the files

Needs ~14 GB of disk for the checkpoint, ~14 GB for the export and ~14 GB for the engines (the
checkpoint is deleted after the export unless ``--keep``). Steps whose output exists are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _child(pid: int) -> int:
    """The first child of ``pid`` (the command under ``/usr/bin/time``), else ``pid`` itself."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = handle.read().split()
    except OSError:
        return pid
    return int(children[0]) if children else pid


def _time_v_peak(log: Path) -> float | None:
    """``Maximum resident set size`` of ``/usr/bin/time -v`` in ``log``, GiB."""
    for line in log.read_text(errors="replace").splitlines():
        if "Maximum resident set size" in line:
            return round(int(line.rsplit(":", 1)[1]) / 2**20, 2)
    return None


def run_step(name: str, command: list[str], limit: int, log: Path) -> dict:
    """Run ``command`` under ``/usr/bin/time -v`` where installed (stdout+stderr to ``log``), watching
    its RSS; returns wall s and peaks (GiB).

    Raises:
        SystemExit: if the step fails or passes ``limit`` bytes of RSS (it is killed first).
    """
    if Path("/usr/bin/time").is_file():
        command = ["/usr/bin/time", "-v", *command]
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        killed = False
        while process.poll() is None:
            status = _status(_child(process.pid))
            for key in peaks:
                peaks[key] = max(peaks[key], status.get(key, 0))
            if status.get("VmRSS", 0) > limit:
                os.kill(_child(process.pid), 9)
                process.kill()
                killed = True
                break
            time.sleep(0.5)
        code = process.wait()
    wall = time.perf_counter() - started
    gib = {k: round(v / 2**30, 2) for k, v in peaks.items()}
    if killed:
        sys.exit(f"[{name}] killed at {gib['VmHWM']} GiB RSS (over --rss-limit-gib) after {wall:.0f} s; log: {log}")
    if code:
        sys.exit(f"[{name}] failed (exit {code}) after {wall:.0f} s; log: {log}")
    timed = _time_v_peak(log)
    print(f"[{name}] {wall:.0f} s, peak RSS {gib['VmHWM']} GiB (anonymous {gib['RssAnon']}, file {gib['RssFile']}; "
          f"/usr/bin/time -v: {timed} GiB)", flush=True)
    return {"wall_s": round(wall, 1), "peak_rss_gib": gib["VmHWM"], "anon_gib": gib["RssAnon"], "file_gib": gib["RssFile"],
            "time_v_peak_gib": timed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="directory for the checkpoint, export and engines")
    parser.add_argument("--size", choices=("7b", "13b"), default="7b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--compute-capability", default="8.9", help="TensorRT-RTX target(s)")
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--profiles", default="auto", help="build --profiles (auto: shared for TensorRT-RTX)")
    parser.add_argument("--rss-limit-gib", type=float, default=18.0, help="kill a step whose RSS passes this")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint after the export")
    args = parser.parse_args()
    python = sys.executable
    cli = [python, "-m", "himap_trt.cli"]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, export, engines = work / "checkpoint", work / "export", work / "engines"
    limit = int(args.rss_limit_gib * 2**30)
    figures = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if not (export / "manifest.json").is_file():
        if not (checkpoint / "config.json").is_file():
            command = [python, str(ROOT / "benchmarks" / "make_big_checkpoint.py"), "--size", args.size, "--out", str(checkpoint)]
            figures["checkpoint"] = run_step("checkpoint", command + (["--layers", str(args.layers)] if args.layers else []),
                                             limit, work / "checkpoint.log")
        figures["export"] = run_step("export", cli + ["export", "--model", str(checkpoint), "--dtype", "fp16", "--no-validate",
                                                      "--out", str(export)], limit, work / "export.log")
        if not args.keep:
            shutil.rmtree(checkpoint)
    figures["build"] = run_step("build", cli + ["build", "--export-dir", str(export), "--engines", str(engines), "--tensorrt", "rtx",
                                                "--compute-capability", args.compute_capability, "--max-batch",
                                                str(args.max_batch), "--profiles", args.profiles],
                                limit, work / "build.log")
    figures["load_average_after"] = os.getloadavg()
    manifest = json.loads((engines / "manifest.json").read_text())
    print(f"\nengines ({manifest['profile_form']} profiles, {', '.join(manifest['compute_capabilities'])}):")
    print(f"{'engine':<26}{'engine MB':>12}{'weights MB':>12}{'ratio':>10}{'build s':>9}")
    totals = {"segment": [0, 0], "all": [0, 0]}
    for entry in manifest["engines"]:
        size, weights = entry["engine_bytes"], entry["weight_bytes"]
        ratio = f"{size / weights:.3f}" if weights >= 1e6 else "-"    # scoring graphs: kernels, no weights
        name = f"{entry['graph']} ({len(entry['parts'])} chunks)" if entry.get("parts") else entry["file"]
        print(f"{name:<26}{size / 1e6:>12,.1f}{weights / 1e6:>12,.1f}{ratio:>10}{entry['build_seconds']:>9.1f}")
        for key in ("segment", "all"):
            if key == "all" or entry["graph"].startswith("segment_"):
                totals[key][0] += size
                totals[key][1] += weights
    for key, (size, weights) in totals.items():
        print(f"{key + ' total':<26}{size / 1e6:>12,.1f}{weights / 1e6:>12,.1f}{size / weights:>10.3f}")
    figures["engines"] = {k: {"engine_bytes": v[0], "weight_bytes": v[1]} for k, v in totals.items()}
    figures["build_peak_rss_bytes_manifest"] = manifest.get("build_peak_rss_bytes")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
