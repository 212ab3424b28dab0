"""Empirical bias correction: remove the mean output shift that weight rounding causes.

Rounding weights shifts each output channel's mean by ``E[(W_q - W) x]``; with few bits
and few weights per channel (depthwise convs) the shift is large and it compounds through
the network. For every quantized layer, on the same calibration inputs, the shift between
the float and the quantized weights is measured per output channel and subtracted from the
bias (Nagel et al. 2019, the data-driven form of DFQ's bias correction).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import run_batches
from edgeslim.quant.modules import QuantConv2d, QuantLinear, QuantMixin


def _forward_with(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(m, QuantConv2d):
        return m._conv_forward(x, w, None)
    return nn.functional.linear(x, w)


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Iterable[Any]) -> int:
    """Adjust the bias of every weight-quantized layer in place; returns how many changed.

    ``batches`` are input batches (a tensor or a tuple of tensors each, ``(inputs, target)``
    pairs too), run as ``model(*inputs)``.
    """
    layers = {
        n: m for n, m in model.named_modules()
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quantizer is not None
    }  # fmt: skip
    shift: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert isinstance(mod, QuantMixin)
            x = mod.quant_input(args[0])
            w = mod._weight
            assert mod.weight_quantizer is not None
            diff = _forward_with(mod, x, mod.weight_quantizer.quantize(w)) - _forward_with(
                mod, x, w
            )
            # per output channel: dim 1 for conv maps, the last dim for linear outputs
            flat = (
                diff.transpose(0, 1).reshape(diff.shape[1], -1)
                if diff.dim() > 2
                else (diff.reshape(-1, diff.shape[-1]).T)
            )
            prev = shift.get(name)
            shift[name] = flat.sum(1) if prev is None else prev + flat.sum(1)
            count[name] = count.get(name, 0) + flat.shape[1]

        return fn

    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    run_batches(model, batches, handles)
    for name, m in layers.items():
        if name not in shift:
            continue
        mean = shift[name] / count[name]
        if m.bias is None:
            m.bias = nn.Parameter(-mean)
        else:
            m.bias.sub_(mean)
    return len(shift)
