"""Run a command and report its peak RSS split into anonymous and file-backed memory.

``/usr/bin/time -v`` gives the peak RSS (VmHWM) only; memory-mapped weights count in it as clean,
reclaimable file pages. This samples ``/proc/<pid>/status`` (RssAnon, RssFile, VmHWM) of the command
every ``--interval`` seconds and prints the maxima (GiB) as one JSON line on stderr.

Usage::

    python benchmarks/rss_split.py -- himap-trt export --model /tmp/big/ck-7b-8 --dtype fp16 --out /tmp/big/ex
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period (s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak: dict[str, int] = {}
    while proc.poll() is None:
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        time.sleep(args.interval)
    gib = {f"max_{k}_gib": round(v / 1024**3, 2) for k, v in sorted(peak.items())}
    print(json.dumps({"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1), **gib}), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
