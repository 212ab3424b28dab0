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
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgeslim.search.errors import SearchError
from edgeslim.search.space import SearchSpace

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


def weight_bits_sensitivity(
    space: SearchSpace, samples: int = HUTCHINSON_SAMPLES, batches: int = HESSIAN_BATCHES
) -> dict[str, LayerSensitivity]:
    """The predicted loss increase of every searched layer with a ``weight`` parameter at
    each of its weight bit-widths (the other layers in float), from one Hutchinson estimate
    on ``batches`` calibration batches of the space's task."""
    from edgeslim.errors import TraceError
    from edgeslim.quant.fold import fold_batchnorm
    from edgeslim.quant.modules import fake_quantized_weight

    model = copy.deepcopy(space.model).eval()
    with contextlib.suppress(TraceError):  # an untraceable model keeps its BN
        fold_batchnorm(model)
    modules = dict(model.named_modules())
    # layers with one ``weight`` parameter (conv, linear); recurrent layers and the like
    # are left out, so a strategy probes them instead
    layers = [
        lc for lc in space.layers
        if len(lc.w_bits) > 1 and isinstance(getattr(modules[lc.fqn], "weight", None), nn.Parameter)
    ]  # fmt: skip
    if not layers:
        return {}
    data = [tuple(b) for b in space.calibration_batches()[:batches]]
    traces = hessian_traces(model, [lc.fqn for lc in layers], data, samples, space.seed)
    out: dict[str, LayerSensitivity] = {}
    for lc in layers:
        w = modules[lc.fqn].weight.detach()
        increase = {}
        for b in lc.w_bits:
            dw = fake_quantized_weight(w, replace(space.weight_spec, bits=b)) - w
            increase[b] = 0.5 * traces[lc.fqn] * float(dw.pow(2).sum())
        out[lc.fqn] = LayerSensitivity(lc.fqn, traces[lc.fqn], increase)
    return out
