"""Hessian-trace sensitivity of weight bits (HAWQ-V2 style), with no measurement.

A layer whose weights are rounded to ``b`` bits moves them by ``dW = Q_b(W) - W``; to
second order the loss grows by about ``1/2 * Tr(H) / n * ||dW||^2`` (``H``: the loss
Hessian of that layer's ``n`` weights, its trace estimated by Hutchinson's method,
``E[z^T H z]`` over Rademacher ``z``). That prices every layer at every bit-width from one
estimate of the traces, where probing costs one full evaluation per layer.

Decisions:

- the loss is the divergence of the model's prediction from its own (the first output's
  softmax over its last dimension, ``KL(p_ref || p)``) on calibration inputs: no labels
  needed, and at the reference its Hessian is the Fisher, which for a model trained with
  cross-entropy approximates the training loss's Hessian. Its unit (nats per sample) is
  the same as a probe's cross-entropy increase, so both kinds of sensitivity can be mixed;
- BatchNorm is folded first, as PTQ does before it rounds, so ``dW`` and ``H`` belong to the
  weights that are really rounded;
- ``dW`` uses the space's own weight quantizer (granularity, observer) at each bit-width.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgeslim.prune.reconstruct import FEW_ROWS
from edgeslim.search.errors import SearchError
from edgeslim.search.space import SearchSpace

if TYPE_CHECKING:
    from edgeslim.graph.coupling import CouplingGroup, GroupMember

HUTCHINSON_SAMPLES = 16
HESSIAN_BATCHES = 2


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer: its Hessian trace per weight and the loss increase at each bit-width."""

    fqn: str
    trace_per_weight: float
    loss_increase: dict[int, float]


def _first_output(out: object) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise SearchError(f"Hessian sensitivity needs a tensor output; got {type(out).__name__}")
    return out


def hessian_traces(
    model: nn.Module,
    fqns: Sequence[str],
    batches: Sequence[tuple[torch.Tensor, ...]],
    samples: int = HUTCHINSON_SAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Per-weight Hessian trace ``Tr(H_l) / n_l`` of each layer's ``weight`` (see module doc).

    ``model`` is used as it is (eval mode, its own prediction is the reference); batches
    are input tuples. Negative estimates (noise on a near-flat layer) are clamped at 0.
    """
    modules = dict(model.named_modules())
    missing = [
        f for f in fqns if not isinstance(getattr(modules.get(f), "weight", None), nn.Parameter)
    ]
    if missing:
        raise SearchError(f"Hessian sensitivity: no weight parameter at {missing[:4]}")
    params = [modules[f].weight for f in fqns]
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    total = [0.0] * len(params)
    count = 0
    try:
        for inputs in batches:
            with torch.no_grad():
                ref = torch.softmax(_first_output(model(*inputs)).float(), dim=-1)
            logp = torch.log_softmax(_first_output(model(*inputs)).float(), dim=-1)
            loss = (ref * (torch.log(ref.clamp_min(1e-12)) - logp)).sum(-1).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for i in range(samples):
                zs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
                dot = sum((g * z).sum() for g, z in zip(grads, zs, strict=True))
                assert isinstance(dot, torch.Tensor)
                hz = torch.autograd.grad(dot, params, retain_graph=i < samples - 1)
                for k, (h, z) in enumerate(zip(hz, zs, strict=True)):
                    total[k] += float((h * z).sum())
            count += samples
    finally:
        for p, flag in zip(model.parameters(), saved, strict=True):
            p.requires_grad_(flag)
    return {
        f: max(t / max(count, 1), 0.0) / p.numel()
        for f, t, p in zip(fqns, total, params, strict=True)
    }


def _folded(space: SearchSpace) -> nn.Module:
    """A copy of the space's model with BatchNorm folded, as PTQ rounds it (see module doc)."""
    from edgeslim.errors import TraceError
    from edgeslim.quant.fold import fold_batchnorm

    model = copy.deepcopy(space.model).eval()
    with contextlib.suppress(TraceError):  # an untraceable model keeps its BN
        fold_batchnorm(model)
    return model


def _weight(modules: dict[str, nn.Module], fqn: str) -> nn.Parameter | None:
    """The layer's one ``weight`` parameter (None: no such layer, or no such parameter)."""
    w = getattr(modules.get(fqn), "weight", None)
    return w if isinstance(w, nn.Parameter) else None


@dataclass(frozen=True)
class _Estimate:
    """The folded copy of a space's model and its layers' Hessian traces per weight."""

    modules: dict[str, nn.Module]
    traces: dict[str, float]
    model: nn.Module


_ESTIMATES: weakref.WeakKeyDictionary[SearchSpace, dict[tuple[int, int], _Estimate]] = (
    weakref.WeakKeyDictionary()
)


def _bit_layers(space: SearchSpace, modules: dict[str, nn.Module]) -> list[str]:
    """Searched layers with weight-bit choices and one ``weight`` parameter (conv, linear);
    recurrent layers and the like are left out, so a strategy probes them instead."""
    return [
        lc.fqn for lc in space.layers if len(lc.w_bits) > 1 and _weight(modules, lc.fqn) is not None
    ]


def _priced_groups(
    space: SearchSpace, modules: dict[str, nn.Module]
) -> dict[int, list[GroupMember]]:
    """Index (into ``space.channel_groups``) -> consumers, of the groups every consumer of
    which is a linear or ungrouped conv reading the group's channels (see
    :func:`keep_sensitivity`)."""
    from edgeslim.graph.patches import rows_supported

    priced: dict[int, list[GroupMember]] = {}
    for i, g in enumerate(space.coupling_groups):
        cons = [m for m in g.members if m.role == "in"]
        weights = [_weight(modules, m.fqn) for m in cons]
        if cons and all(
            w is not None
            and w.dim() >= 2
            and rows_supported(modules[m.fqn]) is None
            and w.shape[1] >= m.offset + g.size * g.unit * m.repeat
            for m, w in zip(cons, weights, strict=True)
        ):
            priced[i] = cons
    return priced


def _estimate(space: SearchSpace, samples: int, batches: int) -> _Estimate:
    """One Hutchinson estimate per space (and sample count) for every layer either kind of
    price needs: the weight-bit layers, then any group consumer not among them."""
    memo = _ESTIMATES.setdefault(space, {})
    hit = memo.get((samples, batches))
    if hit is not None:
        return hit
    model = _folded(space)
    modules = dict(model.named_modules())
    fqns = _bit_layers(space, modules)
    consumers = {m.fqn for cons in _priced_groups(space, modules).values() for m in cons}
    fqns += sorted(consumers - set(fqns))
    data = [tuple(b) for b in space.calibration_batches()[:batches]]
    traces = hessian_traces(model, fqns, data, samples, space.seed) if fqns else {}
    memo[(samples, batches)] = est = _Estimate(modules, traces, model)
    return est


def weight_bits_sensitivity(
    space: SearchSpace, samples: int = HUTCHINSON_SAMPLES, batches: int = HESSIAN_BATCHES
) -> dict[str, LayerSensitivity]:
    """The predicted loss increase of every searched layer with a ``weight`` parameter at
    each of its weight bit-widths (the other layers in float), from one Hutchinson estimate
    on ``batches`` calibration batches of the space's task."""
    from edgeslim.quant.modules import fake_quantized_weight

    est = _estimate(space, samples, batches)
    choices = {lc.fqn: lc.w_bits for lc in space.layers}
    out: dict[str, LayerSensitivity] = {}
    for fqn in _bit_layers(space, est.modules):
        param = _weight(est.modules, fqn)
        assert param is not None  # _bit_layers
        w = param.detach()
        increase = {}
        for b in choices[fqn]:
            dw = fake_quantized_weight(w, replace(space.weight_spec, bits=b)) - w
            increase[b] = 0.5 * est.traces[fqn] * float(dw.pow(2).sum())
        out[fqn] = LayerSensitivity(fqn, est.traces[fqn], increase)
    return out


@dataclass(frozen=True)
class InputMoments:
    """Second moments (float64) of a layer's input rows (a conv's unfolded patches,
    :func:`~edgeslim.graph.patches.input_rows`) with a constant 1 appended,
    ``E[[a, 1] [a, 1]^T]`` (its last row holds the means), over ``rows`` rows."""

    second: torch.Tensor
    rows: int


def input_moments(
    model: nn.Module,
    fqns: Sequence[str],
    batches: Sequence[tuple[torch.Tensor, ...]],
    rows_per_batch: int = 4096,
    seed: int = 0,
) -> dict[str, InputMoments]:
    """:class:`InputMoments` of each layer's input on ``batches``, from up to
    ``rows_per_batch`` sampled rows per batch and call."""
    from edgeslim.graph.patches import input_rows, num_rows

    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(fqns, 0)

    def grab(fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        n = num_rows(module, x)  # type: ignore[arg-type]
        pick = torch.randperm(n, generator=gen)[:rows_per_batch] if n > rows_per_batch else None
        rows = input_rows(module, x, pick).double()  # type: ignore[arg-type]
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        sums[fqn] = sums[fqn] + rows.T @ rows if fqn in sums else rows.T @ rows
        counts[fqn] += rows.shape[0]

    handles = [
        modules[f].register_forward_pre_hook(lambda m, a, f=f: grab(f, m, a[0].detach()))
        for f in fqns
    ]
    try:
        with torch.no_grad():
            for inputs in batches:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [f for f in fqns if not counts[f]]
    if missing:
        raise SearchError(f"Hessian sensitivity: {missing[:4]} did not run on calibration data")
    return {f: InputMoments(sums[f] / counts[f], counts[f]) for f in fqns}


def _lost_energy(
    moments: torch.Tensor, removed: torch.Tensor, bias: bool, refit: bool
) -> torch.Tensor:
    """``E[r r^T]`` of the removed input features ``r`` (``moments`` from
    :func:`input_moments`, ``removed`` a mask over its features without the constant), or,
    when the layer is refitted by least squares, of what is left of them after their best
    prediction from the kept ones (and a constant, when the layer has a bias): the Schur
    complement ``M_rr - M_rk M_kk^-1 M_kr``. That residual is what no refit gives back."""
    r = moments[:-1, :-1][removed][:, removed]
    if not refit:
        return r
    kept = torch.cat([~removed, torch.tensor([bias])])
    m_kk, m_kr = moments[kept][:, kept], moments[kept][:, :-1][:, removed]
    ridge = 1e-9 * (float(m_kk.diagonal().mean()) if m_kk.numel() else 1.0)
    eye = torch.eye(m_kk.shape[0], dtype=moments.dtype)
    return r - m_kr.T @ torch.linalg.solve(m_kk + ridge * eye, m_kr)


def keep_sensitivity(
    space: SearchSpace, samples: int = HUTCHINSON_SAMPLES, batches: int = HESSIAN_BATCHES
) -> dict[str, dict[float, float]]:
    """The predicted loss increase of every searched channel group at each keep ratio, the
    other groups whole, with no measurement.

    Removing a group's units takes away the input features its consumers read them through
    (those columns ``W_r`` of each consumer's weight; the producers' rows go with the
    units). A consumer's output then moves by ``dy = W_r r``; when the space refits pruned
    layers by least squares, only the part of the removed inputs ``r`` the kept ones cannot
    predict is lost (:func:`_lost_energy`). With the output Hessian taken as the layer's
    mean (its weights' Hessian trace per weight, as above, spread over its inputs' energy
    ``E||a||^2``), the loss grows by about
    ``1/2 * Tr(H)/n * n_in * E||dy||^2 / E||a||^2``. With uncorrelated inputs of equal
    energy and no refit that is Optimal Brain Damage's ``1/2 * Tr(H)/n * ||W_r||^2``; the
    refit's residual is what tells a redundant expansion channel (cheap to remove: the
    others predict it) from a residual stream's channel (dear).

    A consumer with fewer calibration rows than ``FEW_ROWS`` per kept input (a classifier
    on a pooled vector: one row per sample) is priced as not refitted: the refit
    cross-validates such a fit and may keep the cut weights, and an exact fit of the
    calibration rows says nothing of held-out ones.

    The removed units are the ones the space's criterion ranks lowest
    (:func:`~edgeslim.prune.planner.keep_map`). A group is left out (to be probed) when a
    consumer is not a linear or ungrouped conv, or it has no consumer at all."""
    from edgeslim.prune.planner import keep_map

    groups, cands = space.channel_groups, space.coupling_groups
    if not groups:
        return {}
    est = _estimate(space, samples, batches)
    priced = _priced_groups(space, est.modules)
    if not priced:
        return {}
    fqns = sorted({m.fqn for cons in priced.values() for m in cons})
    moments = input_moments(est.model, fqns, [tuple(b) for b in space.calibration_batches()],
                            seed=space.seed)  # fmt: skip
    scores = space.group_scores
    out: dict[str, dict[float, float]] = {}
    for i, cons in priced.items():
        g, choice = cands[i], groups[i]
        prices: dict[float, float] = {}
        for ratio in choice.keep:
            width = choice.width(ratio)
            removed = torch.zeros(g.size, dtype=torch.bool)
            if width < g.size:
                removed[:] = True
                removed[keep_map([g], [scores[i]], [width])[g]] = False
            total = 0.0
            for m in cons if removed.any() else ():
                total += _consumer_price(
                    est.modules[m.fqn], moments[m.fqn], est.traces[m.fqn], m, g, removed,
                    space.reconstruct,
                )  # fmt: skip
            prices[ratio] = total
        out[choice.key] = prices
    return out


def _consumer_price(
    module: nn.Module,
    moments: InputMoments,
    trace: float,
    member: GroupMember,
    group: CouplingGroup,
    removed: torch.Tensor,
    refit: bool,
) -> float:
    """One consumer's share of :func:`keep_sensitivity`'s price."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # checked by keep_sensitivity
    w = weight.detach().double()
    w2 = w.reshape(w.shape[0], -1)
    taps = w2.shape[1] // w.shape[1]  # a conv's kernel positions per input channel
    step = group.unit * member.repeat
    channels = torch.zeros(w.shape[1], dtype=torch.bool)
    channels[member.offset : member.offset + group.size * step] = removed.repeat_interleave(step)
    features = channels.repeat_interleave(taps)
    bias = module.bias is not None
    # a fit on fewer rows than that is cross-validated and may keep the cut weights
    # (edgeslim.prune.reconstruct); its residual on the calibration rows is no guide
    refit = refit and moments.rows >= FEW_ROWS * (int((~features).sum()) + bias)
    lost = _lost_energy(moments.second, features, bias, refit)
    w_r = w2[:, features]
    energy = float((w_r @ lost * w_r).sum())
    inputs = float(moments.second[:-1, :-1].trace())
    return 0.5 * trace * w2.shape[1] * max(energy, 0.0) / max(inputs, 1e-30)
