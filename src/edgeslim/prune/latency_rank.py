"""Latency-aware ranking: prefer removing channels whose MACs are slow on this machine.

Under a MACs target the global ranking removes the lowest-scored channels until the MACs
drop enough, whatever each MAC costs. On a CPU they do not cost the same: in ONNX Runtime
a depthwise conv or a high-resolution layer takes several times its share of the MACs in
time. :func:`group_latency_factors` weighs each candidate group by the fp32 kernel time
per MAC of the layers it narrows, read from the machine's per-layer latency table
(:class:`~edgeslim.cost.lut.LatencyTable`, timed once, cached), relative to the model's
average; the planner divides the group's normalised scores by ``factor ** weight``.

Decision — a factor, not a knapsack on latency saved: ranking by score per millisecond
saved is the MACs-knapsack the planner's docstring rejected (it sent whole high-resolution
groups to ``round_to``). A ratio of time per MAC (0.5-1.4 on ``mobilenetv2-imagenet``)
only tilts the order. Measured there (ad hoc, -30% MACs, ``l1_group``, ``round_to=16``,
the imagenet bench's KD fine-tune, agreement on the 118 confident held crops): weight 0:
1.29-1.31x faster than fp32, agreement 88.1; weight 0.5: 1.36-1.37x, 80.5; weight 1:
1.36-1.37x, 85.6 (cosine 0.83 against 0.79 at weight 0). Torch-Pruning at -32.4%: 1.36x,
83.9. In an earlier ``benchmarks/imagenet`` (weight 1): -30% 1.37x and 85.6 (unweighted
1.30x and 88.1); -50% 1.91x but 64.4 (unweighted 1.64x, 83.1): a strong tilt over-prunes
the slow groups at depth. With 8 s per latency pair (2026-12-04, two runs, each timing
the table afresh): -30% 1.33x at 83.1 and 1.40x at 73.7 against 1.31-1.36x at 75.4, -50%
1.86x at 73.7 and 1.83x at 72.0 against 1.59-1.73x at 76.3. The weight
is a trade the user makes (default 0: MACs alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeslim.errors import PruneError
from edgeslim.graph.layers import LayerInfo

if TYPE_CHECKING:
    from edgeslim.cost.lut import LatencyTable
    from edgeslim.prune.planner import MacModel


def layer_ms_per_mac(
    model: nn.Module, rows: Mapping[str, LayerInfo], table: LatencyTable
) -> dict[str, float]:
    """fp32 kernel time per MAC of every layer the table models (others are left out); the
    kernels the table lacks are timed together (:meth:`LatencyTable.measure`)."""
    from edgeslim.cost.lut import layer_keys

    keys = {f: k for f, k in layer_keys(model, rows, {}, {}).items() if k is not None}
    table.measure(keys.values())
    return {f: table.layer_ms(k) * rows[f].calls / rows[f].macs for f, k in keys.items()}


def group_latency_factors(macs: MacModel, per_mac: Mapping[str, float], groups: int) -> list[float]:
    """Per candidate group: the time per MAC of what removing one of its units removes,
    over the model's mean (layers the table does not model count at the mean)."""
    timed = [r for r in macs.rows if r.fqn in per_mac]
    if not timed:
        raise PruneError("latency-aware ranking: the latency table models no prunable layer")
    mean = sum(r.macs * per_mac[r.fqn] for r in timed) / sum(r.macs for r in timed)
    plain = [0.0] * groups
    weighted = [0.0] * groups
    for r in macs.rows:
        w = per_mac.get(r.fqn, mean)
        for ax in r.axes:
            for ci, width in ax.terms:
                removed = r.macs * width / ax.length
                plain[ci] += removed
                weighted[ci] += removed * w
    return [wt / p / mean if p > 0 else 1.0 for p, wt in zip(plain, weighted, strict=True)]


def tilt_scores(scores: Sequence[Any], factors: Sequence[float], weight: float) -> list[Any]:
    """Scores divided by ``factor ** weight``: slow-per-MAC groups rank as less important."""
    return [s / (f**weight) for s, f in zip(scores, factors, strict=True)]
