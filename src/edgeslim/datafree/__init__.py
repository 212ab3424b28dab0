"""Data-free compression: methods that read only the weights and the BatchNorm statistics.

``compress_datafree(model, method, spec, example)`` returns a BN-folded float copy whose
weights a method has rewritten, and the per-layer bit-widths; ``quantized_model(result)``
rounds it for evaluation or export. No data loader is ever touched (a test makes every
data access fail). Methods (:mod:`.methods`): ``rtn`` and ``dfq`` (baselines), ``dfmpc``
(mixed-precision compensation), ``naive`` (prune + RTN), ``merge`` (neuron merging) and
``udfc`` (pruning and rounding compensated together). The shared closed form is in
:mod:`.compensate`, the statistics and safe pairs in :mod:`.chain`.

Every result carries a :class:`DataFreeReport` (``result.report``): the layers changed,
the bits per layer, the MACs removed against the requested fraction, and per pair or
layer what the method did or why not. A method that finds nothing to act on raises
:class:`NothingToCompressError` rather than return the model unchanged.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.datafree.chain import Chain, Pair, Stats, analyze
from edgeslim.datafree.errors import DataFreeError, DataFreeWarning, NothingToCompressError
from edgeslim.datafree.methods import (
    MACS_TOLERANCE,
    METHODS,
    PRUNE_CRITERIA,
    PRUNING_METHODS,
    Method,
    MethodArgs,
    assign_bits,
    no_layers,
)
from edgeslim.datafree.ops import WEIGHT_GRANULARITIES, WeightGranularity, weight_spec
from edgeslim.datafree.report import DataFreeReport


@dataclass(frozen=True)
class DataFreeSpec:
    """What to compress to: weight bits (low/high alternate along pairs), and the fraction
    of the model's MACs to remove (``prune_ratio``, as the prune stage's
    ``macs_reduction``)."""

    low_bits: int = 4
    high_bits: int = 4
    prune_ratio: float = 0.0
    edge_bits: int = 8  # the first and the last layer
    criterion: str = "l2"
    # weight scales per output channel, or one per layer ("tensor": runtimes and
    # accelerators without per-channel weights; DFQ's own setting, where CLE matters most)
    granularity: WeightGranularity = "channel"

    def __post_init__(self) -> None:
        for name in ("low_bits", "high_bits", "edge_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 2 <= value <= 8:
                raise DataFreeError(f"{name} must be an integer in 2..8; got {value!r}")
        if self.low_bits > self.high_bits:
            raise DataFreeError(
                f"low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})"
            )
        if not 0.0 <= self.prune_ratio < 1.0:
            raise DataFreeError(f"prune_ratio must be in [0, 1); got {self.prune_ratio!r}")
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise DataFreeError(
                f"granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}; "
                f"got {self.granularity!r}"
            )
        if self.criterion not in PRUNE_CRITERIA:
            raise DataFreeError(
                f"criterion must be one of {', '.join(PRUNE_CRITERIA)} (data-free criteria); "
                f"got {self.criterion!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataFreeResult:
    model: nn.Module  # BN folded, maybe pruned, weights rewritten (still float)
    weight_bits: dict[str, int]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # per layer: the input range the BN statistics predict (None where they are unknown)
    input_ranges: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    report: DataFreeReport = field(default_factory=DataFreeReport)
    granularity: WeightGranularity = "channel"  # of the weight scales (the spec's)
    # per layer: its output's range before the activation, from BN statistics (where known)
    output_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


# An input range is mean +- RANGE_STDS std per channel, over the channels. Chosen on the
# zoo's Fashion-MNIST CNNs (RTN W8A8, 5,000 validation images, top-1 change vs fp32, mean
# of resnet20, mobilenetv2-small, vgg-small, mobilenetv3-small): 3 std -0.85, 4 std -0.35,
# 5 std -0.16, 6 std -0.13, 8 std -0.23 points. Real activations have heavier tails than
# the Gaussian the BN statistics describe; the Gaussian MSE-optimal range (about 2-3 std
# here) clipped them too much (mobilenetv2-imagenet DFQ W8A8 98.31% vs 98.73% at 4 std).
RANGE_STDS = 6.0
# Statistics estimated through BN-free layers (independent inputs assumed) get twice the
# margin: on prelu-cnn (no BatchNorm) the conv outputs' real 0.1-99.9% ranges on 256
# training images were up to 3.4x the estimated 6-std ones (features.5: -32.1..10.6 against
# -9.4..8.9), as correlated inputs add up. RTN/DFQ/DF-MPC(3/8) W8A8 top-1 on 2,000 test
# images through `compress --quick` (ad hoc, 2026-12-04): 91.10/91.10/90.95 (12 std, every
# layer on integer kernels); 90.70/90.80/90.65 with 6 std; 91.00/90.95/90.70 before the
# BN-free conv outputs had a range at all (float edges, 0.1% of MACs on integer kernels,
# 0.69-0.88x the fp32 speed in ONNX Runtime; 1.55-1.71x now); fp32 91.30.
ESTIMATED_RANGE_STDS = 2 * RANGE_STDS


def _stat_range(s: Stats) -> tuple[float, float]:
    """``mean +- k std`` over the channels: ``k`` is :data:`RANGE_STDS`, or
    :data:`ESTIMATED_RANGE_STDS` for statistics estimated through BN-free layers."""
    k = ESTIMATED_RANGE_STDS if s.estimated else RANGE_STDS
    return float((s.mean - k * s.std).min()), float((s.mean + k * s.std).max())


def _input_ranges(chain: Chain) -> dict[str, tuple[float, float] | None]:
    from edgeslim.datafree.chain import input_stats

    out: dict[str, tuple[float, float] | None] = {}
    for fqn in chain.order:
        s = input_stats(chain, fqn)
        if s is None:
            out[fqn] = None
            continue
        pair = chain.pair_into(fqn)
        if s.bounds is not None:  # the model's input, of a known format: exact
            lo, hi = s.bounds
        else:
            lo, hi = _stat_range(s)
        if pair is not None:  # the activation clips: its bounds are exact
            lo, hi = max(lo, pair.act.lo), min(hi, pair.act.hi)
        if s.clip is not None:  # so does any other (a ReLU read by two ops, ahead of a pool)
            lo, hi = max(lo, s.clip[0]), min(hi, s.clip[1])
        out[fqn] = (lo, hi)
    return out


def _output_ranges(chain: Chain) -> dict[str, tuple[float, float]]:
    """Each layer's output range before its activation, and each GroupNorm's output range
    (:func:`_stat_range`), from BatchNorm statistics where a BN follows the layer, else
    from the statistics propagated to it (estimated: through a BN-free conv assuming
    independent inputs, or a GroupNorm's ``N(beta, gamma^2)``).

    Decision: estimated ranges are used, not left out. Left out, every conv of a net
    without BatchNorm kept a float output (ONNX Runtime cannot fuse a conv whose output is
    not quantized): a small GroupNorm ResNet ran 0% of its MACs on integer kernels after
    RTN W8A8, 0.88x the fp32 speed (ad hoc, 2026-12-04; see docs/datafree.md).

    A module called more than once (a detector's head shared by its pyramid levels) takes
    the union of its calls' ranges. Without it, its output's only bound came from its
    weights (every input at an end at once): on a small FPN whose two 3x3 heads serve three
    levels that range was hundreds of times the outputs' spread, every output rounded to 0 and
    RTN / DFQ W8A8 read cosine 0.000 to fp32 (0.91-0.97 with the union, on random weights
    whose BN statistics do not describe the inputs; ad hoc, 2026-12-05)."""
    out: dict[str, tuple[float, float]] = {}
    for fqn in dict.fromkeys([*chain.order, *chain.outputs]):
        s = chain.pre.get(fqn) or chain.bn_outputs.get(fqn) or chain.outputs.get(fqn)
        if s is not None:
            out[fqn] = _stat_range(s)
    for fqn, calls in chain.shared_outputs.items():  # one range for every call's quantizer
        if fqn not in out:
            ranges = [_stat_range(s) for s in calls]
            out[fqn] = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
    return out


def compress_datafree(
    model: nn.Module,
    method: str | Method,
    spec: DataFreeSpec,
    example: torch.Tensor,
    input_range: tuple[float, float] | None = None,
) -> DataFreeResult:
    """Run data-free ``method`` on a copy of ``model`` (``example``: an input, for tracing).

    ``input_range``: the interval the model's input cannot leave, known from its format
    (:attr:`edgeslim.Task.input_ranges`); it sets the first layer's input range, which is
    otherwise predicted for a standardised input (mean 0, std 1: +-``RANGE_STDS``).

    ``method``: a name of :data:`METHODS`, or any ``(chain, MethodArgs) -> None`` that
    rewrites ``chain.model`` in place (a variant to compare, e.g. an ablation).
    """
    if callable(method):
        run = method
    elif method in METHODS:
        run = METHODS[method]
    else:
        raise DataFreeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if spec.prune_ratio > 0 and not callable(method) and method not in PRUNING_METHODS:
        raise DataFreeError(
            f"method {method!r} does not prune; prune_ratio > 0 needs one of "
            f"{', '.join(PRUNING_METHODS)}"
        )
    start = time.perf_counter()
    with torch.no_grad():
        chain = analyze(model, example, input_range)
        chain.granularity = spec.granularity
        if not chain.order:
            raise no_layers(str(method if isinstance(method, str) else "data-free"), chain)
        bits = assign_bits(chain, spec.low_bits, spec.high_bits, spec.edge_bits)
        before = _snapshot(chain.model, chain.order)
        run(chain, MethodArgs(bits, spec.prune_ratio, spec.criterion, spec.low_bits))
        ranges = _input_ranges(chain)
        outputs = _output_ranges(chain)
    seconds = time.perf_counter() - start
    report = chain.report
    report.method = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    report.weight_bits = dict(bits)
    report.changed = _changed(chain.model, before)
    _measure_macs(report, model, chain.model, example, spec.prune_ratio)
    notes = [*chain.notes, *report.lines()]
    return DataFreeResult(
        chain.model, bits, notes, seconds, ranges, report, spec.granularity, outputs
    )


def _snapshot(model: nn.Module, order: list[str]) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for fqn in order:
        m = model.get_submodule(fqn)
        out[fqn] = [p.detach().clone() for p in (m.weight, getattr(m, "bias", None))
                    if isinstance(p, torch.Tensor)]  # fmt: skip
    return out


def _changed(model: nn.Module, before: dict[str, list[torch.Tensor]]) -> list[str]:
    """Layers whose weight or bias differs from the BN-folded original (shape or values)."""
    now = _snapshot(model, list(before))
    return [f for f, old in before.items() if len(old) != len(now[f])
            or any(a.shape != b.shape or not torch.equal(a, b)
                   for a, b in zip(old, now[f], strict=True))]  # fmt: skip


def _measure_macs(
    report: DataFreeReport, original: nn.Module, result: nn.Module, example: torch.Tensor,
    requested: float,
) -> None:  # fmt: skip
    """MACs before and after, by :func:`~edgeslim.cost.analytic.cost_report` (what the prune
    stage's ``macs_reduction`` measures); a target missed by more than ``MACS_TOLERANCE``
    is warned about and written into the report."""
    from edgeslim.graph import layer_table, total_macs

    # cost_report(...).macs is exactly this sum; its other costs are not needed here
    report.macs_before = total_macs(layer_table(original, example))
    report.macs_after = total_macs(layer_table(result, example))
    if requested <= 0:
        return
    achieved = report.macs_reduction
    if abs(achieved - requested) > MACS_TOLERANCE:
        msg = (f"{report.method}: removed {achieved:.1%} of the MACs, requested "
               f"{requested:.1%} (prune_ratio): only the groups listed as pruned can be "
               "pruned with compensation; see the 'not pruned' entries for the rest")  # fmt: skip
        report.warnings.append(msg)
        warnings.warn(msg, DataFreeWarning, stacklevel=3)


def quantized_model(
    result: DataFreeResult, act_bits: int | None = 8, act_ranges: str = "dynamic",
    edges: bool = False,
) -> nn.Module:  # fmt: skip
    """A fake-quant copy of ``result.model``: weights at their bits, activations at ``act_bits``.

    ``act_ranges="dynamic"``: per-tensor ranges of each tensor as it flows (ONNX Runtime's
    dynamic quantization). ``"statistics"``: fixed ranges predicted by the BN statistics
    (``result.input_ranges``), so a QDQ export carries data-free scales too; a layer whose
    input statistics are unknown keeps a float input. Neither needs calibration data.

    ``edges`` (statistics ranges only): quantize the graph's edges as PTQ does
    (:func:`edgeslim.quant.edges.quantize_edges`: residual adds, pools, conv outputs), with
    ranges carried from the BN statistics (:mod:`.edge_ranges`), so ONNX Runtime runs the
    export on integer kernels throughout instead of leaving a float conv before each add.
    """
    import copy

    from edgeslim.quant import QuantConfig, QuantSpec, quantize_
    from edgeslim.quant.modules import QuantMixin

    if act_ranges not in ("dynamic", "statistics"):
        raise DataFreeError(f"act_ranges must be dynamic or statistics; got {act_ranges!r}")
    static = act_ranges == "statistics"
    act = None
    if act_bits is not None:
        observer = "minmax" if static else "dynamic"
        act = QuantSpec(bits=act_bits, granularity="tensor", symmetric=False, observer=observer)
    select: dict[str, QuantConfig | None] = {}
    for fqn, b in result.weight_bits.items():
        known = result.input_ranges.get(fqn) is not None
        weights = weight_spec(b, result.granularity)
        # with edges, a layer whose input statistics are unknown gets an input quantizer
        # too: the edge pass's interval carry (:mod:`.edge_ranges`) may bound it (a
        # squeeze-excite product, a hardswish output) or removes it
        quantized_input = known or not static or edges
        select[fqn] = QuantConfig(weights, act if quantized_input else None)
    m = copy.deepcopy(result.model).eval()
    quantize_(m, QuantConfig(weight=None), select=select)  # type: ignore[arg-type]
    if static and act is not None:
        for fqn, bounds in result.input_ranges.items():
            layer = m.get_submodule(fqn)
            if bounds is not None and isinstance(layer, QuantMixin) and layer.input_quant:
                quantizer = layer.input_quant.quantizer
                set_range = getattr(quantizer, "set_range", None)
                assert callable(set_range)
                set_range(*bounds)
    quantized_inputs = any(isinstance(q, QuantMixin) and q.input_quant for q in m.modules())
    if edges and static and act is not None and quantized_inputs:
        # (with no statistics anywhere, a BN-free net, every activation stays float and the
        # export's coverage warning names the layers)
        from edgeslim.datafree.edge_ranges import fill_edge_ranges
        from edgeslim.quant.edges import quantize_edges

        gm = quantize_edges(m)
        fill_edge_ranges(gm, result.output_ranges)
        return gm
    return m


__all__ = [
    "ESTIMATED_RANGE_STDS",
    "METHODS",
    "RANGE_STDS",
    "Chain",
    "DataFreeError",
    "DataFreeReport",
    "DataFreeResult",
    "DataFreeSpec",
    "DataFreeWarning",
    "NothingToCompressError",
    "Pair",
    "Stats",
    "analyze",
    "assign_bits",
    "compress_datafree",
    "quantized_model",
]
