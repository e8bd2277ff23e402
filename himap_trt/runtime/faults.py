"""Test-only fault injection into the engine's backend calls (``HIMAP_TRT_TEST_FAULT``)."""

from __future__ import annotations

import logging
import time

from himap_trt.errors import HimapError

log = logging.getLogger("himap_trt.runtime.engine")

#: Test-only fault injection (see :class:`FaultPlan`); never set in production.
FAULT_ENV = "HIMAP_TRT_TEST_FAULT"


class FaultPlan:
    """Test-only faults injected into the engine's backend calls, read from ``HIMAP_TRT_TEST_FAULT``.

    The variable holds comma-separated ``PHASE:N[:ACTION]`` items: before the N-th (1-based) call of
    ``PHASE`` (``prefill`` or ``decode``), ``error`` (the default) raises a RuntimeError as a crashing
    backend would, and ``hang=S`` sleeps S seconds (a wedged backend). Example:
    ``HIMAP_TRT_TEST_FAULT=decode:5,prefill:9:hang=3``. Used by the reliability tests and
    benchmarks/serve_faults.py; unset (the default) it costs one dictionary lookup per call.

    Raises:
        HimapError: a malformed value (naming the variable and the item).
    """

    def __init__(self, text: str | None):
        self.faults: dict[tuple[str, int], tuple[str, float]] = {}
        self.calls = {"prefill": 0, "decode": 0}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            fields = item.strip().split(":")
            try:
                phase, number = fields[0], int(fields[1])
                action = fields[2] if len(fields) > 2 else "error"
                seconds = float(action.split("=", 1)[1]) if action.startswith("hang=") else 0.0
                valid = (phase in self.calls and number >= 1 and len(fields) <= 3
                         and (action == "error" or action.startswith("hang=") and seconds >= 0))
            except (IndexError, ValueError):
                valid = False
            if not valid:
                raise HimapError(f"{FAULT_ENV}: {item.strip()!r} is not PHASE:N[:error|hang=SECONDS] with PHASE "
                                 "prefill or decode and N >= 1 (a test-only hook; unset it)")
            self.faults[(phase, number)] = ("hang" if action.startswith("hang=") else "error", seconds)

    def before(self, phase: str) -> None:
        """Called before each backend call of ``phase``: raise or sleep where the plan says."""
        self.calls[phase] += 1
        fault = self.faults.get((phase, self.calls[phase]))
        if fault is None:
            return
        kind, seconds = fault
        log.warning("%s: injecting %s into %s call %d", FAULT_ENV, kind, phase, self.calls[phase])
        if kind == "hang":
            time.sleep(seconds)
            return
        raise RuntimeError(f"injected fault ({FAULT_ENV}) in {phase} call {self.calls[phase]}")
