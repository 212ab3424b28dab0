"""The data-free methods: each rewrites the float weights of an analysed :class:`Chain`.

A method is ``(chain, spec, bits) -> None``: it may rescale, merge, prune and bias-correct
``chain.model`` in place; the weights are rounded to ``bits`` afterwards by
:func:`edgeslim.datafree.quantized_model` with the quantizer the methods assumed.

- ``rtn``: nothing (per-channel round-to-nearest of the BN-folded weights).
- ``dfq``: cross-layer equalization over the ReLU pairs, then analytic bias correction
  (Nagel et al. 2019; high-bias absorption is not done).
- ``dfmpc``: the low-bit layers clamped and rescaled to keep their output variance, every
  pair's rounding compensated in the consumer (:mod:`.compensate`), with the low/high
  bit-widths alternating along the pairs (:func:`assign_bits`).
- ``naive``: prune the lowest-``criterion`` channels of every safely prunable group, RTN.
- ``merge``: neuron merging (Kim et al. 2020): each pruned filter is merged into the kept
  filter most like it (cosine plus normalised-bias distance), scaled by the norm ratio; RTN.
- ``udfc``: prune and round in one pass; each pruned channel is represented by the kept
  channel that explains most of it, each kept channel compensated for its rounding, the
  rest of every channel's mean moved into the bias (:mod:`.compensate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgeslim.datafree.chain import Chain, Pair, input_stats
from edgeslim.datafree.compensate import (
    compensate_all,
    correct_bias,
    input_variance,
    match_variance,
)
from edgeslim.datafree.gaussian import IDENTITY, RELU
from edgeslim.datafree.ops import columns, mse_clip, quantize_weight, scale_channels, scale_rows
from edgeslim.graph.coupling import CouplingGroup, fx_coupling_groups

CLE_ITERATIONS = 8
PRUNE_CRITERIA = ("l1", "l2", "fpgm", "random")


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
    prune_ratio: float
    criterion: str


def assign_bits(chain: Chain, low: int, high: int, edge: int) -> dict[str, int]:
    """Per-layer weight bits: ``edge`` for the first and last layer, low/high alternating.

    Walking the pairs in graph order, a producer not yet assigned gets ``low`` and its
    consumer ``high`` (so every low-bit layer has a higher-precision consumer to compensate
    it); every other layer gets ``high``. ``low == high`` is uniform precision.
    """
    bits = {chain.order[0]: edge, chain.order[-1]: edge}
    if low != high:
        for fqn in chain.order:
            pair = chain.pairs.get(fqn)
            if pair is None or fqn in bits or bits.get(pair.consumer, high) < high:
                continue
            bits[fqn] = low
            bits.setdefault(pair.consumer, high)
    for fqn in chain.order:
        bits.setdefault(fqn, high if low != high else low)
    return bits


def rtn(chain: Chain, args: MethodArgs) -> None:
    """Round-to-nearest: the weights are rounded as they are."""


def _equalizable(pair: Pair) -> bool:
    return pair.act in (RELU, IDENTITY)


@torch.no_grad()
def cross_layer_equalize(chain: Chain, iterations: int = CLE_ITERATIONS) -> list[str]:
    """DFQ's CLE over every pair whose activation commutes with scaling (ReLU, none).

    Channel k of the producer is divided by ``s_k = sqrt(r1_k / r2_k)`` and the consumer's
    columns multiplied by it (``r1``, ``r2``: the producer row's and the consumer columns'
    absolute maxima), which leaves both at ``sqrt(r1 r2)``; the BN statistics follow.
    Returns the producers skipped (ReLU6 does not commute with scaling).
    """
    skipped = [p.producer for p in chain.pairs.values() if not _equalizable(p)]
    for _ in range(iterations):
        for pair in chain.pairs.values():
            if not _equalizable(pair):
                continue
            prod, cons = chain.layer(pair.producer), chain.layer(pair.consumer)
            r1 = prod.weight.detach().abs().reshape(prod.weight.shape[0], -1).amax(1)
            if pair.depthwise:
                r2 = cons.weight.detach().abs().reshape(cons.weight.shape[0], -1).amax(1)
            else:
                r2 = columns(cons, pair.repeat).abs().amax(dim=(0, 2))
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            scale_rows(prod, s)
            scale_channels(cons, s, pair)
            pre = chain.pre[pair.producer]
            s64 = s.to(torch.float64)
            pre.mean, pre.var = pre.mean / s64, pre.var / (s64 * s64)
    return skipped


@torch.no_grad()
def bias_correct_all(chain: Chain, bits: dict[str, int]) -> None:
    """Analytic bias correction of every layer whose input statistics are known."""
    for fqn in chain.order:
        m = chain.layer(fqn)
        w = m.weight.detach().clone()
        correct_bias(m, w, quantize_weight(w, bits[fqn]), input_stats(chain, fqn))


def dfq(chain: Chain, args: MethodArgs) -> None:
    """Cross-layer equalization + bias correction."""
    skipped = cross_layer_equalize(chain)
    if skipped:
        chain.notes.append(
            "dfq: no equalization across ReLU6 (not scale-equivariant) after: " + ", ".join(skipped)
        )
    bias_correct_all(chain, args.bits)


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
            match_variance(m, original[fqn], x, bits[fqn])
    return original


def dfmpc(chain: Chain, args: MethodArgs) -> None:
    """Mixed-precision compensation (see the module doc for the measured choices).

    The low-bit layers are clamped to their MSE-optimal ranges and rescaled to keep their
    output variance; then, in graph order, every layer's rounding is bias-corrected against
    its original weights and every pair's consumer absorbs the change of its input's mean
    (``E[a] - E[aq]``, :func:`~.compensate.compensate`).
    """
    original = clip_low_bits(chain, args.bits, min(args.bits.values()))
    compensate_all(chain, args.bits, rescale=False, bias=True, reference=original)


# --- pruning ------------------------------------------------------------------------------


def _group_pair(chain: Chain, group: CouplingGroup) -> tuple[str, bool] | None:
    """The producer whose channels ``group`` is, and whether the group is just its pair."""
    if not group.prunable or group.kind != "channel" or len(group.producers) != 1:
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


def choose_pruned(chain: Chain, ratio: float, criterion: str) -> PruneSet:
    """The channels every pruning method removes: the same set for a fair comparison.

    Only groups that are a safe pair (or a pair through a depthwise conv) are pruned, each
    by ``ratio`` of its channels (at least one kept), lowest ``criterion`` scores first.
    """
    if ratio <= 0:
        return PruneSet()
    from edgeslim.prune.importance import get_importance

    groups = fx_coupling_groups(chain.model, chain.example)
    chosen = {g: found for g in groups if (found := _group_pair(chain, g)) is not None}
    scores = get_importance(criterion).scores(chain.model, list(chosen))
    by_producer: dict[str, list[int]] = {}
    keep: dict[CouplingGroup, list[int]] = {}
    simple: set[str] = set()
    for group, (producer, is_simple) in chosen.items():
        n_keep = max(1, round(group.size * (1.0 - ratio)))
        order = torch.argsort(scores[group.id], descending=True)
        keep[group] = sorted(order[:n_keep].tolist())
        by_producer[producer] = sorted(order[n_keep:].tolist())
        if is_simple:
            simple.add(producer)
    return PruneSet(by_producer, keep, frozenset(simple))


def _surgery(chain: Chain, prune: PruneSet) -> None:
    from edgeslim.prune.surgery import prune_groups

    if prune.keep:
        prune_groups(chain.model, prune.keep)


def naive(chain: Chain, args: MethodArgs) -> None:
    """Prune by the criterion, then round to nearest."""
    _surgery(chain, choose_pruned(chain, args.prune_ratio, args.criterion))


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
    prune = choose_pruned(chain, args.prune_ratio, args.criterion)
    for producer in chain.order:  # graph order: a merge edits the next producer's columns
        if producer in prune.simple:
            _merge_neurons(chain, producer, prune.by_producer[producer])
    _surgery(chain, prune)


def udfc(chain: Chain, args: MethodArgs) -> None:
    """Unified data-free compression: prune and round, compensated in one closed form."""
    prune = choose_pruned(chain, args.prune_ratio, args.criterion)
    compensate_all(chain, args.bits, prune.by_producer, merge_into=prune.simple, bias=False)
    _surgery(chain, prune)


METHODS: dict[str, Method] = {
    "rtn": rtn, "dfq": dfq, "dfmpc": dfmpc, "naive": naive, "merge": merge, "udfc": udfc,
}  # fmt: skip
PRUNING_METHODS = ("naive", "merge", "udfc")
