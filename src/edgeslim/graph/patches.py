"""A linear layer's input as one row per output value: ``y_rows = rows @ W.reshape(N, -1).T``.

Least-squares refits (:mod:`edgeslim.prune.reconstruct`) and input statistics for data-aware
low rank (:mod:`edgeslim.lowrank.whiten`) both need each layer's input laid out against its
weight matrix: the last dimension for a linear, the unfolded ``C x k x k`` patches (the
weight's own order) for an ungrouped 1-D or 2-D conv, with its padding applied as the conv
applies it (zeros, reflect, replicate or circular; ``"same"`` and ``"valid"`` too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PatchLayer = nn.Linear | nn.Conv1d | nn.Conv2d


def rows_supported(module: nn.Module) -> str | None:
    """None when :func:`input_rows` handles ``module``, else why not."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        return "a transposed conv"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return None if module.groups == 1 else f"grouped conv (groups={module.groups})"
    return f"{type(module).__name__} is neither a linear nor a 1-D/2-D conv"


def _pad(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the conv pads it (so the unfold itself needs no padding)."""
    kernel, dilation = module.kernel_size, module.dilation
    if module.padding == "valid":
        return x
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(int(p), int(p)) for p in module.padding]
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad: last dim first
    if not any(flat):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def input_rows(module: PatchLayer, x: torch.Tensor) -> torch.Tensor:
    """``module``'s input ``x`` as ``(output values, weight columns)`` rows."""
    why = rows_supported(module)
    if why is not None:
        raise ValueError(f"input_rows: {why}")
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x = _pad(module, x)
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(
            x.unsqueeze(2), kernel_size=(1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]), stride=(1, module.stride[0]),
        )  # fmt: skip
    else:
        cols = F.unfold(
            x, kernel_size=module.kernel_size, dilation=module.dilation, stride=module.stride
        )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(module: PatchLayer, y: torch.Tensor) -> torch.Tensor:
    """``module``'s output ``y`` as ``(output values, channels)`` rows, in the order of
    :func:`input_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])
