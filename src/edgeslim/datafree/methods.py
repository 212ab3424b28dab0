"""The data-free methods: each rewrites the float weights of an analysed :class:`Chain`.

A method is ``(chain, spec, bits) -> None``: it may rescale, merge, prune and bias-correct
``chain.model`` in place; the weights are rounded to ``bits`` afterwards by
:func:`edgeslim.datafree.quantized_model` with the quantizer the methods assumed.

- ``rtn``: nothing (per-channel round-to-nearest of the BN-folded weights).
- ``dfq``: cross-layer equalization over every pair whose activation is positively
  homogeneous (ReLU, PReLU, LeakyReLU, none; ReLU6 only on the channels its BN statistics
  say never reach the clip), high-bias absorption and analytic bias correction where BN
  statistics give the means (Nagel et al. 2019); the layers at the spec's low bits are
  clamped to their MSE-optimal range and variance-matched first, as in ``dfmpc``.
- ``dfmpc``: the low-bit layers clamped, rounded against their modelled input covariance
  (:mod:`.rounding`) and rescaled to keep their output variance, every pair's rounding
  compensated in the consumer (:mod:`.compensate`), with the low/high
  bit-widths alternating along the pairs (:func:`assign_bits`).
- ``naive``: prune the lowest-``criterion`` channels of every safely prunable group, RTN.
  ``prune_ratio`` is a fraction of the model's MACs (as the ``prune`` stage's
  ``macs_reduction``): one channel ratio for every prunable group, searched to meet it.
- ``merge``: neuron merging (Kim et al. 2020): each pruned filter is merged into the kept
  filter most like it (cosine plus normalised-bias distance), scaled by the norm ratio; RTN.
- ``udfc``: prune and round in one pass; each pruned channel is represented by the kept
  channel that explains most of it, each kept channel compensated for its rounding, the
  rest of every channel's mean moved into the bias (:mod:`.compensate`); a consumer that
  only keeps its pruned channels' means is rescaled back to its original output variance
  (:func:`~.compensate.restore_variance`).

Every method records what it did in ``chain.report`` (per pair, per layer, channels
removed) and raises :class:`~.errors.NothingToCompressError` when it finds nothing to act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeslim.datafree.chain import (
    COMPUTE,
    CONVS,
    NORMS,
    Chain,
    Pair,
    input_stats,
    is_depthwise,
    kernel_window,
)
from edgeslim.datafree.compensate import (
    SPATIAL_CORR,
    compensate_all,
    correct_bias,
    input_variance,
    match_variance,
    spatial_kernel,
)
from edgeslim.datafree.covariance import input_moments
from edgeslim.datafree.errors import NothingToCompressError
from edgeslim.datafree.gaussian import IDENTITY, RELU, _cdf
from edgeslim.datafree.ops import (
    add_bias,
    channel_effect,
    columns,
    mse_clip,
    quantize_weight,
    scale_channels,
    scale_rows,
    weight_of,
)
from edgeslim.datafree.rounding import MAX_ROW, round_with_covariance, row_gram
from edgeslim.graph.coupling import CouplingGroup, fx_coupling_groups
from edgeslim.prune.config import MACS_TOLERANCE

CLE_ITERATIONS = 8
PRUNE_CRITERIA = ("l1", "l2", "fpgm", "random")
CLIP_TOL = 1e-3  # a clip (ReLU6) is "active" on a channel where P(z > hi) exceeds this
CLIP_STDS = 4.0  # equalized ReLU6 channels keep mean + CLIP_STDS std below the clip
ABSORB_STDS = 3.0  # high-bias absorption moves max(0, mean - ABSORB_STDS std) (DFQ's 3)
MAX_GROUP_RATIO = 0.9  # at most this fraction of a group's channels is removed
SHORT_ROW = 32  # weights per output row below which low-bit rounding is worst (assign_bits)
RAISE_SHARE = 0.05  # short-row layers stay high while they hold under this share of the low


@dataclass(frozen=True)
class PruneSet:
    """Channels to remove: per producer, and the coupling groups to give to the surgery."""

    by_producer: dict[str, list[int]] = field(default_factory=dict)
    keep: dict[CouplingGroup, list[int]] = field(default_factory=dict)
    simple: frozenset[str] = frozenset()  # producers whose group is exactly their pair


Method = Callable[[Chain, "MethodArgs"], None]


@dataclass(frozen=True)
class MethodArgs:
    bits: dict[str, int]
    prune_ratio: float  # fraction of the model's MACs to remove (naive, merge, udfc)
    criterion: str
    low_bits: int | None = None  # the spec's low bits (None: the lowest of ``bits``)

    @property
    def low(self) -> int:
        return self.low_bits if self.low_bits is not None else min(self.bits.values())


def assign_bits(chain: Chain, low: int, high: int, edge: int) -> dict[str, int]:
    """Per-layer weight bits: ``edge`` for the first and last layer, low/high alternating.

    Walking the pairs in graph order, a producer not yet assigned gets ``low`` and its
    consumer ``high`` (so every low-bit layer has a higher-precision consumer to compensate
    it); every other layer gets ``high``. ``low == high`` is uniform precision.

    With mixed precision, a depthwise conv the walk made low is raised to ``high``: it holds
    a negligible share of the weights (one ``kh x kw`` kernel per channel), and a per-channel
    scale over 9 weights at 2-3 bits is the classic worst case of rounding, which its
    consumer can only rescale channel by channel. Measured on mobilenetv2-imagenet at 3/8
    (statistics act ranges), with the depthwise ``features.1.conv.0.0`` (0.03% of the
    low-bit weights) at 3 bits and at 8: RTN 0.8% -> 53.4% agreement, DF-MPC 52.5% -> 62.7%.

    For the same reason, the other layers whose rows hold fewer than :data:`SHORT_ROW`
    weights (a 1x1 conv reading 16 or 24 channels) are raised too, as long as together they
    hold under :data:`RAISE_SHARE` of the low-bit weights: raising them then costs next to
    nothing in size. Where they are most of the low-bit layers (mobilenetv3-small's three),
    they stay low, since otherwise nothing would be. Measured on mobilenetv2-imagenet at 3/8
    (2026-12-02, ad hoc, weights only, one low layer at a time): the 16-input expansion
    ``features.2.conv.0.0`` alone cost DF-MPC 5.5 points of agreement, as much as any
    layer (most cost 0-2.5); raising the three short-row expansions (0.24% of the
    weights) moved RTN from 51.7% to 61.4% and DF-MPC from 81.4% to 89.0% (W3/8A8,
    statistics ranges).
    """
    bits = {chain.order[0]: edge, chain.order[-1]: edge}
    if low != high:
        for fqn in chain.order:
            pair = chain.pairs.get(fqn)
            if pair is None or fqn in bits or bits.get(pair.consumer, high) < high:
                continue
            bits[fqn] = low
            bits.setdefault(pair.consumer, high)
        for fqn, b in bits.items():
            if b == low and is_depthwise(chain.layer(fqn)):
                bits[fqn] = high
        _raise_short_rows(chain, bits, low, high)
    for fqn in chain.order:
        bits.setdefault(fqn, high if low != high else low)
    return bits


def _row_length(m: nn.Module) -> int:
    w = weight_of(m)
    return w[0].numel() if w.dim() > 1 else 1


def _raise_short_rows(chain: Chain, bits: dict[str, int], low: int, high: int) -> None:
    """Raise the low layers with rows under :data:`SHORT_ROW` weights (see
    :func:`assign_bits`) when they hold under :data:`RAISE_SHARE` of the low-bit weights."""
    lowered = [f for f, b in bits.items() if b == low]
    short = [f for f in lowered if _row_length(chain.layer(f)) < SHORT_ROW]
    total = sum(weight_of(chain.layer(f)).numel() for f in lowered)
    held = sum(weight_of(chain.layer(f)).numel() for f in short)
    if short and held < RAISE_SHARE * total:
        bits.update(dict.fromkeys(short, high))


def explain_bits(chain: Chain, bits: dict[str, int], low: int, edge: int) -> dict[str, str]:
    """Per layer, why it has its bit-width (the DF-MPC notes): low and compensated where,
    or which rule kept it higher."""
    first, last = chain.order[0], chain.order[-1]
    out: dict[str, str] = {}
    for fqn in chain.order:
        b = bits[fqn]
        pair = chain.pairs.get(fqn)
        feeding = chain.pair_into(fqn)
        if fqn in (first, last):
            where = "only" if first == last else "first" if fqn == first else "last"
            out[fqn] = f"{b} bits: {where} layer (edge_bits {edge})"
        elif b <= low and pair is not None and chain.pre[fqn].estimated:
            out[fqn] = (f"{b} bits (low): clipped and rescaled; its consumer {pair.consumer} is "
                        "high-bit but no mean compensation: no BatchNorm statistics for its "
                        "output (estimated ones made it worse)")  # fmt: skip
        elif b <= low and pair is not None:
            out[fqn] = (f"{b} bits (low): clipped, rescaled and compensated in "
                        f"{pair.consumer} through {pair.act_name}")  # fmt: skip
        elif feeding is not None and bits[feeding.producer] <= low < b:
            out[fqn] = f"{b} bits (high): compensates the low-bit {feeding.producer}"
        elif pair is not None and bits[pair.consumer] <= low:
            out[fqn] = f"{b} bits: its consumer {pair.consumer} is low-bit, nothing compensates"
        elif pair is not None and b > low and is_depthwise(chain.layer(fqn)):
            out[fqn] = (f"{b} bits: a depthwise conv is not lowered (a negligible share of "
                        "the weights, and the worst case of per-channel rounding)")  # fmt: skip
        elif pair is not None and b > low and _row_length(chain.layer(fqn)) < SHORT_ROW:
            out[fqn] = (f"{b} bits: rows of {_row_length(chain.layer(fqn))} weights are not "
                        f"lowered (under {SHORT_ROW}: the worst case of per-channel rounding, "
                        "and a negligible share of the weights)")  # fmt: skip
        else:
            out[fqn] = f"{b} bits: " + chain.why_not(fqn)
    return out


def rtn(chain: Chain, args: MethodArgs) -> None:
    """Round-to-nearest: the weights are rounded as they are."""


def _homogeneity(pair: Pair) -> str | None:
    """None if ``act(s z) = s act(z)`` for ``s > 0`` (exactly, or for ReLU6 where the clip is
    inactive: checked per channel), else why not."""
    act = pair.act
    if act.leaky or act in (RELU, IDENTITY):
        return None
    if act.lo == 0.0 and not math.isinf(act.hi):
        return None  # ReLU6 / Hardtanh(0, hi): per channel, see _clip_bounds
    return f"{pair.act_name} clips at {act.lo:g} and {act.hi:g}: not positively homogeneous"


def _clip_bounds(chain: Chain, pair: Pair) -> tuple[torch.Tensor, torch.Tensor] | str:
    """For a ``clip(z, 0, hi)`` pair: which channels may be scaled (the clip is inactive, by
    the BN statistics) and how far; a reason where nothing is known."""
    pre = chain.pre.get(pair.producer)
    if pre is None:
        return f"{pair.act_name} clips at {pair.act.hi:g} and no statistics say how often"
    hi = pair.act.hi
    active = (1.0 - _cdf((hi - pre.mean) / pre.std.clamp_min(1e-12))) > CLIP_TOL
    return active, pre.mean.new_zeros(len(active))


@torch.no_grad()
def cross_layer_equalize(chain: Chain, iterations: int = CLE_ITERATIONS) -> dict[str, str]:
    """DFQ's CLE over every pair whose activation commutes with positive scaling.

    Channel k of the producer is divided by ``s_k = sqrt(r1_k / r2_k)`` and the consumer's
    columns multiplied by it (``r1``, ``r2``: the producer row's and the consumer columns'
    absolute maxima), which leaves both at ``sqrt(r1 r2)``; the BN statistics follow.
    PReLU/LeakyReLU commute exactly (``prelu(z / s) = prelu(z) / s`` per channel). ReLU6
    commutes only below its clip: a channel whose BN statistics reach 6 (``P > CLIP_TOL``)
    is not scaled, the others only so far that ``mean + 4 std`` stays below 6 (the paper
    replaces ReLU6 by ReLU instead, which changes the model).
    A fan-out pair (an activation read by several convs/linears: a Fire or Inception
    block, :attr:`Pair.others`) takes ``r2`` over every consumer's columns and scales them
    all: the largest of them meets the producer, as the one consumer of a pair does.
    Returns, per ``"producer -> consumer[, ...]"``, what was done or why not.
    """
    out: dict[str, str] = {}
    todo: list[tuple[Pair, torch.Tensor | None]] = []
    for fqn in chain.order:
        pair = chain.pairs.get(fqn) or chain.unmeasured.get(fqn) or chain.fanned.get(fqn)
        if pair is None:
            continue
        key = pair.label
        why = _homogeneity(pair)
        if why is not None:
            out[key] = f"not equalized: {why}"
            continue
        frozen: torch.Tensor | None = None
        if not (pair.act.leaky or pair.act in (RELU, IDENTITY)):
            bounds = _clip_bounds(chain, pair)
            if isinstance(bounds, str):
                out[key] = f"not equalized: {bounds}"
                continue
            frozen = bounds[0]
            if bool(frozen.all()):
                out[key] = (f"not equalized: {pair.act_name} clip at {pair.act.hi:g} is active "
                            f"(P > {CLIP_TOL:g}) on every channel")  # fmt: skip
                continue
        todo.append((pair, frozen))
    scaled: dict[str, torch.Tensor] = {}
    for _ in range(iterations):
        for pair, frozen in todo:
            prod = chain.layer(pair.producer)
            consumers = [chain.layer(c) for c in pair.consumers]
            r1 = prod.weight.detach().abs().reshape(prod.weight.shape[0], -1).amax(1)
            if pair.depthwise:
                cons = consumers[0]
                r2 = cons.weight.detach().abs().reshape(cons.weight.shape[0], -1).amax(1)
            else:  # a fan-out pair: the largest column of channel k over its consumers
                r2 = torch.stack([columns(c, pair.repeat).abs().amax(dim=(0, 2))
                                  for c in consumers]).amax(0)  # fmt: skip
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            pre = chain.pre.get(pair.producer)
            if frozen is not None and pre is not None:  # keep z / s below the clip
                floor = ((pre.mean + CLIP_STDS * pre.std) / pair.act.hi).clamp_min(1e-6)
                s = torch.where(frozen, torch.ones_like(s), torch.maximum(s, floor.to(s.dtype)))
            scale_rows(prod, s)
            for cons in consumers:
                scale_channels(cons, s, pair)
            if pre is not None:
                s64 = s.to(torch.float64)
                pre.mean, pre.var = pre.mean / s64, pre.var / (s64 * s64)
            total = scaled.get(pair.producer, torch.ones_like(s))
            scaled[pair.producer] = total * s
    for pair, frozen in todo:
        s = scaled[pair.producer]
        spread = f"scales {float(s.min()):.3g}..{float(s.max()):.3g}"
        text = f"equalized through {pair.act_name} ({spread})"
        if frozen is not None and bool(frozen.any()):
            text += (f"; clip at {pair.act.hi:g} active on {int(frozen.sum())}/{len(frozen)} "
                     "channels, those left unscaled")  # fmt: skip
        elif frozen is not None:
            text += f"; clip at {pair.act.hi:g} inactive on every channel (BN statistics)"
        out[pair.label] = text
    return out


@torch.no_grad()
def absorb_high_bias(chain: Chain) -> dict[str, str]:
    """DFQ's high-bias absorption: ``c = max(0, mean - 3 std)`` of each channel's
    pre-activation leaves the producer's bias for the consumer's (``relu(z) = relu(z - c) + c``
    while ``z >= c``; the same for a leaky ReLU), shrinking the activation range to
    quantize. Needs BN statistics: estimated ones would guess ``c``."""
    out: dict[str, str] = {}
    for fqn in chain.order:
        pair = chain.pairs.get(fqn) or chain.fanned.get(fqn)
        if pair is None or not (pair.act.leaky or pair.act == RELU):
            continue
        key = pair.label
        pre = chain.pre[fqn]
        if pre.estimated:
            out[key] = "no high-bias absorption: no BatchNorm statistics for its output"
            continue
        c = (pre.mean - ABSORB_STDS * pre.std).clamp_min(0.0)
        if not bool((c > 0).any()):
            continue
        for cons in map(chain.layer, pair.consumers):
            add_bias(cons, channel_effect(cons, c, pair.repeat))
        add_bias(chain.layer(fqn), -c)
        pre.mean = pre.mean - c
        out[key] = f"high bias absorbed on {int((c > 0).sum())}/{len(c)} channels"
    return out


@torch.no_grad()
def bias_correct_all(
    chain: Chain, bits: dict[str, int], bn_only: bool = False,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Analytic bias correction of every layer whose input statistics are known
    (``bn_only``: known from BatchNorm, not estimated). ``reference`` (by layer): the
    weights the rounding is measured against where the current ones were already changed
    (clamped, rescaled; the BN statistics describe the reference). Returns the layers
    skipped, why."""
    reference = reference or {}
    skipped: dict[str, str] = {}
    for fqn in chain.order:
        m = chain.layer(fqn)
        x = input_stats(chain, fqn)
        if x is None:
            skipped[fqn] = "no bias correction: the statistics of its input are unknown"
            continue
        if bn_only and x.estimated:
            skipped[fqn] = ("no bias correction: no BatchNorm statistics for its input "
                            "(estimated ones would guess the mean)")  # fmt: skip
            continue
        w = m.weight.detach().clone()
        correct_bias(m, reference.get(fqn, w), quantize_weight(w, bits[fqn], chain.granularity), x)
    return skipped


def _unhandled(chain: Chain | None) -> list[str]:
    """The layers with weights that data-free methods do not model (a Conv3d, a GRU, a
    transposed conv): named, so an empty analysis is not a mystery."""
    if chain is None:
        return []
    found = [f"{fqn} ({type(m).__name__})" for fqn, m in chain.model.named_modules()
             if fqn and not isinstance(m, COMPUTE) and not list(m.children())
             and any(n.startswith("weight") for n, _ in m.named_parameters(recurse=False))
             and not isinstance(m, (*NORMS, nn.LayerNorm, nn.GroupNorm, nn.PReLU))]  # fmt: skip
    return found


def _nothing(
    method: str, what: str, reasons: list[str], chain: Chain | None = None
) -> NothingToCompressError:
    shown = reasons[:8] + ([f"... and {len(reasons) - 8} more"] if len(reasons) > 8 else [])
    unhandled = _unhandled(chain)
    if not shown and not unhandled:  # e.g. every layer inside a module fx keeps whole
        shown = ["no pair of conv/linear layers is visible in the traced graph (layers "
                 "inside modules torch.fx keeps whole, such as torch's transformer layers, "
                 "are not analysed)"]  # fmt: skip
    if unhandled:
        more = f" and {len(unhandled) - 6} more" if len(unhandled) > 6 else ""
        shown.append("layers data-free methods do not model (only Conv1d/2d/3d and Linear): "
                     f"{', '.join(unhandled[:6])}{more}")  # fmt: skip
    return NothingToCompressError(
        f"{method}: {what}; the model is unchanged, so no {method} result is returned. "
        + "Per layer: "
        + "; ".join(shown)
    )


def no_layers(method: str, chain: Chain) -> NothingToCompressError:
    """The error for a model with no Conv1d/2d/3d or Linear layer in its traced graph."""
    return _nothing(method, "no Conv1d/2d/3d or Linear layer to work on", [], chain)


def dfq(chain: Chain, args: MethodArgs) -> None:
    """Cross-layer equalization, high-bias absorption, low-bit clamping and bias correction.

    After CLE and absorption, every layer at the spec's low bits or fewer is clamped to
    its MSE-optimal per-channel range and rescaled to keep its output variance
    (:func:`clip_low_bits`, DF-MPC's steps 1-2: per-channel min-max rounding of a 4-bit
    depthwise or expansion row wastes its grid on a few large weights); the bias correction
    then removes each layer's mean shift against its weights before the clamp (BN
    statistics only). Measured on mobilenetv2-imagenet W4A8 (statistics act ranges):
    CLE + absorption + correction 69.5% agreement, + clamp 78.0%, + variance match 86.4%.
    Tried and dropped (2026-12-05, same model, W4A8 with statistics ranges, 84.7% as it
    stands; 86.4% with float activations, so the weights set the figure): rounding the 4-bit
    layers against their modelled input covariance as ``dfmpc`` does, 76.7% (at one width
    every layer's input is already perturbed, which the modelled covariance does not know);
    DF-MPC's mean compensation through each pair instead of per-layer bias correction, 84.3%.
    Then each depthwise conv is rounded against the spatial correlation of its input window
    (:func:`round_depthwise`): 84.7% -> 88.6% (W8A8 98.3% -> 99.2%).
    """
    pairs = cross_layer_equalize(chain)
    done = [k for k, v in pairs.items() if v.startswith("equalized")]
    blocked = [chain.why_not(f) for f in chain.order[:-1] if f not in chain.pairs
               and f not in chain.unmeasured and f not in chain.fanned]  # fmt: skip
    if not done:
        reasons = [f"{k}: {v.removeprefix('not equalized: ')}" for k, v in pairs.items()]
        raise _nothing("dfq", "nothing to equalize (no positively homogeneous pair)",
                       reasons + blocked, chain)  # fmt: skip
    for key, text in absorb_high_bias(chain).items():
        pairs[key] = f"{pairs[key]}; {text}"
    chain.report.pairs.update(pairs)
    for line in blocked:
        key, _, why = line.partition(": ")
        chain.report.pairs[key] = f"not a pair: {why}"
    original = clip_low_bits(chain, args.bits, args.low)
    for fqn in original:
        chain.report.layers[fqn] = (f"{args.bits[fqn]} bits: clipped to its MSE-optimal range "
                                    "and rescaled to keep its output variance")  # fmt: skip
    for fqn, text in round_depthwise(chain, args.bits, args.low).items():
        chain.report.layers[fqn] += f"; {text}"
    skipped = bias_correct_all(chain, args.bits, bn_only=True, reference=original)
    for fqn, why in skipped.items():
        clipped = chain.report.layers.get(fqn)
        chain.report.layers[fqn] = f"{clipped}; {why}" if clipped else why


@torch.no_grad()
def clip_low_bits(
    chain: Chain, bits: dict[str, int], low: int, match: bool = True
) -> dict[str, torch.Tensor]:
    """Clamp every layer at ``low`` bits or fewer to its MSE-optimal range (:func:`mse_clip`),
    then (``match``) restore its output variance (:func:`~.compensate.match_variance`).

    Returns the original weights of the layers changed, to measure their rounding against.
    """
    original: dict[str, torch.Tensor] = {}
    for fqn in chain.order:
        if bits[fqn] > low:
            continue
        m = chain.layer(fqn)
        x = input_stats(chain, fqn)
        original[fqn] = m.weight.detach().clone()
        m.weight.copy_(mse_clip(m.weight, bits[fqn], weights=input_variance(m, x)))
        if match:
            match_variance(m, original[fqn], x, bits[fqn], chain.granularity)
    return original


@torch.no_grad()
def round_depthwise(chain: Chain, bits: dict[str, int], low: int) -> dict[str, str]:
    """Round every depthwise conv at ``low`` bits or fewer onto its own grid against the
    spatial correlation of its input window (:func:`~.rounding.round_with_covariance` with
    the prior of :func:`~.compensate.spatial_kernel`), instead of weight by weight.

    Why a depthwise conv (a channel multiplier included), and only it: each of its rows
    reads one channel, so the centred second moment of a row's input is that channel's
    variance times the spatial prior, the same matrix for every row up to scale, and no
    modelled correlation between channels
    (which made rounding every low-bit layer against its modelled covariance cost DFQ W4A8
    8 points) enters. Neighbouring pixels move together, so errors of one sign on a 3x3
    kernel add up where nearest rounding leaves them; the feedback makes them cancel, as
    SQuant's kernel-wise constraint does. Its rows are also the shortest (9 weights), where
    rounding costs most: raising a single depthwise conv of mobilenetv2-imagenet from 4 to 8
    bits gained DFQ W4A8 up to 4.2 points of agreement (ad hoc, 2026-12-05). The mean shift
    this leaves is removed by the bias correction that follows.

    Measured on mobilenetv2-imagenet (the ``imagenet`` suite's 236 confident crops,
    statistics activation ranges, ad hoc, 2026-12-05): W4A8 agreement 84.75% -> 88.56%
    (cosine 0.853 -> 0.850, top-5 agreement 84.8% -> 82.9%); W8A8 per channel 98.31% ->
    99.15%, per tensor 99.58% both; with the prior's correlation at 0.6 or 0.9 instead of
    :data:`~.compensate.SPATIAL_CORR` (0.8, kept: not tuned on these crops) 90.68% and
    89.83%. On the zoo's Fashion-MNIST MobileNets (2,000 validation images, W4A8 / W3A8 top-1):
    mobilenetv2-small 93.00 / 92.00 -> 93.00 / 92.15, mobilenetv3-small 91.55 / 84.90 ->
    91.45 / 84.30.
    """
    out: dict[str, str] = {}
    for fqn in chain.order:
        m = chain.layer(fqn)
        # depthwise, a channel multiplier included: each row reads one input channel
        one_channel = isinstance(m, CONVS) and 1 < m.groups == m.in_channels
        if bits[fqn] > low or not one_channel:
            continue
        h = spatial_kernel(*kernel_window(weight_of(m)))
        q, short = round_with_covariance(m.weight, m.weight, h, bits[fqn], chain.granularity)
        m.weight.copy_(q)
        fell = f" ({short} rows to nearest: their rounding left the grid's end)" if short else ""
        out[fqn] = f"rounded against its input's spatial correlation (prior {SPATIAL_CORR}){fell}"
    return out


@torch.no_grad()
def round_low_bits(
    chain: Chain, bits: dict[str, int], low: int, original: dict[str, torch.Tensor]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Round every layer at ``low`` bits or fewer against its input covariance
    (:mod:`.rounding`), onto the grid its current (clipped) weights set; ``original``: its
    weights before the clamp, the ones rounded. Returns per layer what was done or why not,
    and the input covariance (in weight-row order) of each layer so rounded.
    """
    layers = [f for f in chain.order if bits[f] <= low and f in original]
    found = input_moments(chain.source, chain.example, layers) if chain.source else {}
    out: dict[str, str] = {}
    grams: dict[str, torch.Tensor] = {}
    for fqn in layers:
        m = chain.layer(fqn)
        x = found.get(fqn)
        if (row := weight_of(m)[0].numel()) > MAX_ROW:
            out[fqn] = (
                f"rounded to nearest: its rows read {row} inputs, over the {MAX_ROW} "
                "covariance rounding is kept to (memory grows with the square)"
            )
            continue
        h = None if x is None else row_gram(m, x)
        if h is None or x is None:
            out[fqn] = "rounded to nearest: the covariance of its input is unknown"
            continue
        q, short = round_with_covariance(original[fqn], m.weight, h, bits[fqn], chain.granularity)
        m.weight.copy_(q)
        centred = row_gram(m, x, centred=True)
        if centred is not None:
            grams[fqn] = centred
        out[fqn] = "rounded against its input covariance" + (
            f" ({short} rows to nearest: their rounding left the grid's end)" if short else ""
        )
    return out, grams


def dfmpc(chain: Chain, args: MethodArgs) -> None:
    """Mixed-precision compensation (see the module doc for the measured choices).

    The low-bit layers are clamped to their MSE-optimal ranges, rounded against the channel
    covariance of their input (modelled from the BN statistics, :mod:`.covariance` and
    :mod:`.rounding`; nearest rounding where it cannot be followed or with one scale per
    layer) and rescaled to keep their output variance; then, in graph order, every layer's
    rounding is bias-corrected against
    its original weights and every pair's consumer absorbs the change of its input's mean
    (``E[a] - E[aq]``, :func:`~.compensate.compensate`). Pairs without BatchNorm (e.g.
    conv -> PReLU -> conv) still alternate bits and get the clamp and rescale, which need
    no means; their mean compensation is skipped and the notes say so per layer. Raises
    :class:`NothingToCompressError` when no layer can take the low bits.
    """
    low = args.low
    lowered = [f for f in chain.order if args.bits[f] <= low]
    if not lowered:
        edge = args.bits[chain.order[0]]
        raise _nothing("dfmpc", f"no layer can take {low} bits (the first and last layers keep "
                       "edge_bits; mixed precision needs a low layer with a high consumer: use "
                       "one width instead, e.g. method dfq or rtn with low_bits = high_bits)", [
            f"{f}: {why}" for f, why in explain_bits(chain, args.bits, low, edge).items()
        ], chain)  # fmt: skip
    if not chain.pairs:
        raise _nothing("dfmpc", "no pair to compensate the rounding in",
                       [chain.why_not(f) for f in chain.order], chain)  # fmt: skip
    if chain.granularity == "channel":
        original = clip_low_bits(chain, args.bits, low, match=False)
        rounding, grams = round_low_bits(chain, args.bits, low, original)
        for fqn, ref in original.items():  # a row's gain goes into its own scale: still on grid
            m = chain.layer(fqn)
            match_variance(m, ref, input_stats(chain, fqn), args.bits[fqn], chain.granularity)
    else:  # one scale per layer: a row's gain would move it off the grid it was rounded to
        original = clip_low_bits(chain, args.bits, low)
        rounding = dict.fromkeys(original, "rounded to nearest: one weight scale per layer")
        grams = {}
    compensate_all(chain, args.bits, rescale=False, bias=True, reference=original,
                   bn_only=True, grams=grams)  # fmt: skip
    edge = args.bits[chain.order[0]]
    notes = explain_bits(chain, args.bits, low, edge)
    for fqn, text in rounding.items():
        notes[fqn] = f"{notes[fqn]}; {text}"
    chain.report.layers.update(notes)


# --- pruning ------------------------------------------------------------------------------


def _group_pair(chain: Chain, group: CouplingGroup) -> tuple[str, bool] | None:
    """The producer whose channels ``group`` is, and whether the group is just its pair."""
    if (
        not group.prunable
        or group.kind != "channel"
        or group.unit != 1
        or len(group.producers) != 1
    ):
        return None
    producer = group.producers[0]
    pair = chain.pairs.get(producer)
    if pair is None:
        return None
    dw = [m.fqn for m in group.members if m.role == "depthwise"]
    if not dw:
        return (producer, True) if group.consumers == [pair.consumer] else None
    # producer -> depthwise -> consumer: a chain of two pairs, the channels go together
    tail = chain.pairs.get(dw[0])
    if len(dw) == 1 and pair.consumer == dw[0] and tail is not None:
        return (dw[0], False) if group.consumers == [tail.consumer] else None
    return None


class _MacModel:
    """Total MACs (conv/linear, as ``cost_report`` counts them) as a function of how many
    channels each chosen group loses: a layer's MACs scale with its kept input columns
    times its kept output rows (a depthwise conv: with its channels)."""

    def __init__(self, chain: Chain, groups: list[CouplingGroup]) -> None:
        from edgeslim.graph import layer_table

        table = layer_table(chain.model, chain.example)
        axes: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for gi, g in enumerate(groups):
            for mem in g.members:
                dim = {"out": 0, "depthwise": 0, "in": 1}.get(mem.role)
                if dim is not None:
                    axes.setdefault((mem.fqn, dim), []).append((gi, mem.repeat if dim else 1))
        self.rows: list[tuple[int, list[tuple[int, list[tuple[int, int]]]]]] = []
        self.base = 0
        for fqn, info in table.items():
            self.base += info.macs
            mine = [(d, t) for (f, d), t in axes.items() if f == fqn]
            if mine and info.macs:
                w = weight_of(chain.model.get_submodule(fqn))
                self.rows.append((info.macs, [(int(w.shape[d]), t) for d, t in mine]))
        self.fixed = self.base - sum(m for m, _ in self.rows)

    def reduction(self, removed: list[int]) -> float:
        total = float(self.fixed)
        for macs, row_axes in self.rows:
            m = float(macs)
            for length, terms in row_axes:
                m *= (length - sum(removed[gi] * w for gi, w in terms)) / length
            total += m
        return 1.0 - total / self.base if self.base else 0.0


def _widths(groups: list[CouplingGroup], ratio: float) -> list[int]:
    """Channels removed per group at one channel ratio (at least one channel kept)."""
    return [g.size - max(1, round(g.size * (1.0 - ratio))) for g in groups]


def _ratio_for(macs: _MacModel, groups: list[CouplingGroup], target: float) -> float:
    """The channel ratio whose MACs reduction is closest to ``target`` (bisection over a
    monotone step function, then the nearer of the two ends).

    A target the groups cannot meet within ``MACS_TOLERANCE`` (they hold too few of the
    model's MACs, e.g. mobilenetv3-small's three safe groups, 8% of its MACs) is not chased
    to ``MAX_GROUP_RATIO``: stripping 90% of those groups' channels for an unreachable
    target left the model at chance. Each group then loses ``target`` of its channels (the
    requested fraction, read per group) and the miss is reported as before.
    """
    lo, hi = 0.0, MAX_GROUP_RATIO
    if macs.reduction(_widths(groups, hi)) < target - MACS_TOLERANCE:
        return min(target, hi)
    if macs.reduction(_widths(groups, hi)) <= target:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs.reduction(_widths(groups, mid)) < target:
            lo = mid
        else:
            hi = mid
    err_lo = abs(macs.reduction(_widths(groups, lo)) - target)
    return lo if err_lo < abs(macs.reduction(_widths(groups, hi)) - target) else hi


def choose_pruned(chain: Chain, ratio: float, criterion: str, method: str = "pruning") -> PruneSet:
    """The channels every pruning method removes: the same set for a fair comparison.

    ``ratio`` is the fraction of the model's MACs to remove. Only groups that are a safe
    pair (or a pair through a depthwise conv) are pruned, all by one channel ratio (searched
    so that the MACs drop by ``ratio``; at most ``MAX_GROUP_RATIO``, at least one channel
    kept), lowest ``criterion`` scores first. Records the choice in ``chain.report``;
    raises :class:`NothingToCompressError` if no group can be pruned.
    """
    report = chain.report
    report.prune_ratio = ratio
    if ratio <= 0:
        return PruneSet()
    from edgeslim.prune.importance import get_importance

    groups = fx_coupling_groups(chain.model, chain.example)
    chosen = {g: found for g in groups if (found := _group_pair(chain, g)) is not None}
    covered = {f for found in chosen.values() for f in (found[0],)}
    covered |= {m.fqn for g in chosen for m in g.members if m.role in ("out", "depthwise")}
    for fqn in chain.order[:-1]:
        if fqn not in covered:
            why = (
                chain.why_not(fqn)
                if fqn not in chain.pairs
                else f"{fqn}: its channels are coupled beyond its pair (not prunable safely)"
            )
            key, _, text = why.partition(": ")
            report.pairs[key] = f"not pruned: {text}"
    if not chosen:
        raise _nothing(method, "no channel group can be removed safely",
                       [f"{k}: {v}" for k, v in report.pairs.items()])  # fmt: skip
    order_groups = list(chosen)
    macs = _MacModel(chain, order_groups)
    channel_ratio = _ratio_for(macs, order_groups, ratio)
    removed = _widths(order_groups, channel_ratio)
    report.predicted_reduction = macs.reduction(removed)
    scores = get_importance(criterion).scores(chain.model, order_groups)
    by_producer: dict[str, list[int]] = {}
    keep: dict[CouplingGroup, list[int]] = {}
    simple: set[str] = set()
    for group, n_removed in zip(order_groups, removed, strict=True):
        producer, is_simple = chosen[group]
        if n_removed == 0:
            continue
        order = torch.argsort(scores[group.id], descending=True)
        keep[group] = sorted(order[: group.size - n_removed].tolist())
        by_producer[producer] = sorted(order[group.size - n_removed :].tolist())
        report.channels_removed[producer] = n_removed
        if is_simple:
            simple.add(producer)
        pair = chain.pairs[producer]
        report.pairs[f"{producer} -> {pair.consumer}"] = (
            f"pruned {n_removed}/{group.size} channels ({criterion})"
        )
    if not keep:
        raise _nothing(method, f"a MACs target of {ratio:.1%} removes no channel",
                       [f"{k}: {v}" for k, v in report.pairs.items()])  # fmt: skip
    return PruneSet(by_producer, keep, frozenset(simple))


@torch.no_grad()
def _surgery(chain: Chain, prune: PruneSet) -> None:
    """Remove the chosen channels with the shared surgery (PReLU slopes included)."""
    from edgeslim.prune.surgery import prune_groups

    if prune.keep:
        prune_groups(chain.model, dict(prune.keep))


def naive(chain: Chain, args: MethodArgs) -> None:
    """Prune by the criterion, then round to nearest."""
    _surgery(chain, choose_pruned(chain, args.prune_ratio, args.criterion, "naive"))


@torch.no_grad()
def _merge_neurons(chain: Chain, producer: str, pruned: list[int]) -> None:
    pair = chain.pairs[producer]
    prod, cons = chain.layer(producer), chain.layer(pair.consumer)
    w = prod.weight.detach().reshape(prod.weight.shape[0], -1).to(torch.float64)
    b = prod.bias.detach().to(torch.float64) if prod.bias is not None else torch.zeros(len(w))
    norm = w.norm(dim=1).clamp_min(1e-12)
    unit, nb = w / norm[:, None], b / norm
    kept = [k for k in range(len(w)) if k not in set(pruned)]
    kt = torch.tensor(kept)
    cols = columns(cons, pair.repeat)
    new = cols.clone()
    for i in pruned:
        cos = unit[kt] @ unit[i]
        dist = (1 - cos) + (nb[kt] - nb[i]).abs()
        j = int(torch.argmin(dist))
        if cos[j] > 0:
            new[:, kept[j]] += (norm[i] / norm[kept[j]]).to(cols.dtype) * cols[:, i]
    cons.weight.copy_(new.reshape(cons.weight.shape))


def merge(chain: Chain, args: MethodArgs) -> None:
    """Neuron merging (pruning only), then round to nearest."""
    prune = choose_pruned(chain, args.prune_ratio, args.criterion, "merge")
    for producer in chain.order:  # graph order: a merge edits the next producer's columns
        if producer in prune.simple:
            _merge_neurons(chain, producer, prune.by_producer[producer])
    _surgery(chain, prune)


def udfc(chain: Chain, args: MethodArgs) -> None:
    """Unified data-free compression: prune and round, compensated in one closed form."""
    prune = choose_pruned(chain, args.prune_ratio, args.criterion, "udfc")
    compensate_all(
        chain, args.bits, prune.by_producer, merge_into=prune.simple, bias=False,
        keep_variance=True,
    )  # fmt: skip
    _surgery(chain, prune)


METHODS: dict[str, Method] = {
    "rtn": rtn, "dfq": dfq, "dfmpc": dfmpc, "naive": naive, "merge": merge, "udfc": udfc,
}  # fmt: skip
PRUNING_METHODS = ("naive", "merge", "udfc")
