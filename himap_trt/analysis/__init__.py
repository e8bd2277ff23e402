"""Analysis services over the runtime: ``evaluate`` (accuracy of pruning methods on question sets),
``bench`` (interleaved latency/throughput measurements), ``check`` (backends compared graph by graph
and end to end) and ``analyze`` (the papers' per-layer diagnostics on the PyTorch model)."""
