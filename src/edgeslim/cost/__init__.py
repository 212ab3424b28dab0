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
    RatioStats,
    Windows,
    compare_in_windows,
    compare_latency,
    measure_latency,
    ort_runner,
    ratio_over_rounds,
    torch_runner,
)

__all__ = [
    "CostReport",
    "LatencyStats",
    "RatioStats",
    "Windows",
    "bops",
    "compare_in_windows",
    "compare_latency",
    "cost_report",
    "measure_latency",
    "ort_runner",
    "peak_activation_bytes",
    "ratio_over_rounds",
    "size_bytes",
    "torch_runner",
]
