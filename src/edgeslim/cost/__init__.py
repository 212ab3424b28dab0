"""Cost model: analytic (params, MACs, BOPs, size, peak activations) and measured latency."""

from edgeslim.cost.analytic import (
    CostReport,
    bops,
    cost_report,
    peak_activation_bytes,
    size_bytes,
)
from edgeslim.cost.latency import (
    LatencyStats,
    compare_latency,
    measure_latency,
    ort_runner,
    torch_runner,
)

__all__ = [
    "CostReport",
    "LatencyStats",
    "bops",
    "compare_latency",
    "cost_report",
    "measure_latency",
    "ort_runner",
    "peak_activation_bytes",
    "size_bytes",
    "torch_runner",
]
