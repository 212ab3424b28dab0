"""A linear layer's input as one row per output value: ``y_rows = rows @ W.reshape(N, -1).T``.

Least-squares refits (:mod:`edgeslim.prune.reconstruct`) and input statistics for data-aware
low rank (:mod:`edgeslim.lowrank.whiten`) both need each layer's input laid out against its
weight matrix: the last dimension for a linear, the unfolded ``C x k x k`` patches (the
weight's own order) for an ungrouped 1-D, 2-D or 3-D conv, with its padding applied as the
conv applies it (zeros, reflect, replicate or circular; ``"same"`` and ``"valid"`` too).
A 1-D conv is unfolded as a 2-D one of one row; a 3-D conv's patches are gathered by index
(``F.unfold`` takes 4-D inputs only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PatchLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def rows_supported(module: nn.Module) -> str | None:
    """None when :func:`input_rows` handles ``module``, else why not."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed conv"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None if module.groups == 1 else f"grouped conv (groups={module.groups})"
    return f"{type(module).__name__} is neither a linear nor a 1-D/2-D/3-D conv"


def _pad(module: Conv, x: torch.Tensor) -> torch.Tensor:
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


def input_rows(
    module: PatchLayer, x: torch.Tensor, pick: torch.Tensor | None = None
) -> torch.Tensor:
    """``module``'s input ``x`` as ``(output values, weight columns)`` rows; with ``pick``
    (row indices, < :func:`num_rows`) only those rows, gathered without unfolding the rest
    (a 3x3 conv's unfolded input at 224x224 is 9 times its input: gigabytes for a batch)."""
    why = rows_supported(module)
    if why is not None:
        raise ValueError(f"input_rows: {why}")
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows if pick is None else rows[pick]
    x = _pad(module, x)
    if isinstance(module, nn.Conv3d):
        kernel3, dilation3, stride3 = module.kernel_size, module.dilation, module.stride
        if pick is None:
            pick = torch.arange(num_rows(module, x, padded=True))
        return _gathered(x, kernel3, dilation3, stride3, pick)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (1, *module.stride),
        )
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if pick is not None:
        return _gathered(x, kernel, dilation, stride, pick)
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def num_rows(module: PatchLayer, x: torch.Tensor, padded: bool = False) -> int:
    """How many rows :func:`input_rows` gives for input ``x`` (the layer's output values
    per output channel); ``padded``: ``x`` is already padded as the conv pads it."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    n = x.shape[0]
    for size in _out_size(module, x if padded else _pad(module, x)):
        n *= size
    return n


def _out_size(module: Conv, padded: torch.Tensor) -> list[int]:
    spatial = padded.shape[2:]
    return [
        (int(size) - d * (k - 1) - 1) // s + 1
        for size, k, d, s in zip(
            spatial, module.kernel_size, module.dilation, module.stride, strict=True
        )
    ]


def _gathered(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    pick: torch.Tensor,
) -> torch.Tensor:
    """The unfold's rows ``pick`` of padded ``x`` (N, C, *spatial): each output position's
    ``C x k1 x ... x kd`` patch, read by index (output positions in row-major order)."""
    outs = [
        (int(size) - d * (k - 1) - 1) // s + 1
        for size, k, d, s in zip(x.shape[2:], kernel, dilation, stride, strict=True)
    ]
    per_sample = 1
    for o in outs:
        per_sample *= o
    n, at = pick // per_sample, pick % per_sample
    coords: list[torch.Tensor] = []
    for o in reversed(outs):  # the last spatial axis varies fastest
        coords.append(at % o)
        at = at // o
    coords.reverse()
    dims = len(kernel)
    rows, channels = len(pick), x.shape[1]

    index = [n.reshape(rows, *[1] * (dims + 1)), torch.arange(channels).reshape(1, -1, *[1] * dims)]
    for i, (c, k, d, s) in enumerate(zip(coords, kernel, dilation, stride, strict=True)):
        taps = c[:, None] * s + torch.arange(k) * d  # (R, k)
        shape = [rows, 1, *[1] * dims]
        shape[2 + i] = k
        index.append(taps.reshape(shape))
    patches = x[tuple(index)]  # (R, C, k1, ..., kd): the weight's own order
    return patches.reshape(rows, -1)


def output_rows(module: PatchLayer, y: torch.Tensor) -> torch.Tensor:
    """``module``'s output ``y`` as ``(output values, channels)`` rows, in the order of
    :func:`input_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])
