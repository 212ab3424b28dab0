"""SmoothQuant: move activation outliers into the weights before W8A8.

Transformer activations have a few channels tens of times larger than the rest (BERT's
LayerNorm outputs, the GELU output feeding the FFN's second linear), so one per-tensor
activation scale wastes most of the int8 grid on them. Dividing input channel ``j`` by
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` and multiplying weight column ``j`` by it
leaves the float product unchanged and balances the two ranges (Xiao et al., 2023).

BERT is post-LayerNorm: every LayerNorm output also feeds a residual add, so the divisor
cannot be folded into the LayerNorm as in pre-LN models; it stays an explicit per-channel
division in front of the activation quantizer (one cheap elementwise op per input tensor,
shared by layers that read the same tensor, e.g. query/key/value).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.quant.modules import QuantMixin

EPS = 1e-5


@torch.no_grad()
def input_absmax(
    model: nn.Module, batches: Iterable[Any], layers: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per-input-channel ``max|x|`` of each layer, and the layers grouped by shared input.

    Layers fed the very same tensor in the first batch share a group, so they get one
    divisor and the runtime computes the division once. The first inputs are held until
    the grouping is done: a tensor freed during the batch could otherwise hand its address
    to a later one of the same shape, and two unrelated layers would share a divisor (it
    happened on MiniLM, depending on the allocator's state: the W8A8 cosine varied from
    0.953 to 0.996 between processes with the same seed).
    """
    stats: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    hooks = []
    for fqn, layer in layers.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], fqn: str = fqn) -> None:
            x = args[0]
            if fqn not in first:
                first[fqn] = x  # held: its address stays its own (see above)
            cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            stats[fqn] = torch.maximum(stats[fqn], cur) if fqn in stats else cur

        assert isinstance(layer, nn.Module)
        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    by_input: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for fqn in layers:
        if fqn in first:
            x = first[fqn]
            by_input.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(fqn)
    first.clear()
    return stats, list(by_input.values())


@torch.no_grad()
def smooth_(
    model: nn.Module,
    batches: Iterable[Any],
    alpha: float = 0.6,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> dict[str, torch.Tensor]:
    """Smooth every quantized layer of ``layer_types`` with an input quantizer, in place.

    Run after :func:`edgeslim.quant.quantize_` (weights are re-calibrated here, since their
    columns change). ``alpha`` in [0, 1] sets how much of the activation range moves into
    the weights. Returns ``{fqn: s}``. Calling it twice compounds, so it refuses to.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    layers: dict[str, Any] = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantMixin) and isinstance(m, layer_types) and m.input_quant is not None
    }
    done = [n for n, m in layers.items() if getattr(m, "smooth_scale", None) is not None]
    if done:
        raise ValueError(f"layers already smoothed: {', '.join(done[:3])}")
    stats, groups = input_absmax(model, batches, layers)
    scales: dict[str, torch.Tensor] = {}
    for group in groups:
        a = stats[group[0]].clamp_min(EPS)
        w = torch.stack([_weight_colmax(layers[n]) for n in group]).amax(0).clamp_min(EPS)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(EPS)
        for fqn in group:
            layer = layers[fqn]
            layer.weight.mul_(s)
            layer.smooth_scale = s.clone()
            if layer.weight_quantizer is not None:
                layer._init_weight_range()
            scales[fqn] = s
    return scales


def _weight_colmax(layer: QuantMixin) -> torch.Tensor:
    w = layer._weight.detach()
    return w.abs().reshape(w.shape[0], w.shape[1], -1).amax(dim=(0, 2))
