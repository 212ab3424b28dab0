"""Weight-space operations the data-free methods share.

Weights are rounded by the very quantizer :func:`~edgeslim.quant.quantize_` later applies
(uniform, symmetric, per output channel, min-max range), so what a method compensates is
exactly the error the deployed model makes. A *channel effect* is how a per-channel input
vector (a mean, a shift) reaches a layer's outputs: summed over the kernel for a conv, over
the repeated positions after a flatten, and one-to-one for a depthwise conv.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from edgeslim.datafree.chain import Pair, group_inputs, is_depthwise
from edgeslim.quant.modules import make_quantizer
from edgeslim.quant.spec import QuantSpec

WeightGranularity = Literal["channel", "tensor"]
WEIGHT_GRANULARITIES: tuple[str, ...] = get_args(WeightGranularity)


def weight_spec(bits: int, granularity: WeightGranularity = "channel") -> QuantSpec:
    """The weight quantization every data-free method assumes (and evaluates with):
    symmetric min-max, one scale per output channel or (``"tensor"``) per layer."""
    return QuantSpec(bits=bits, granularity=granularity, symmetric=True)


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, bits: int, granularity: WeightGranularity = "channel"
) -> torch.Tensor:
    """``w`` rounded to ``bits`` as :func:`weight_spec` says, same dtype."""
    q = make_quantizer(weight_spec(bits, granularity), True)
    q.init_range(w.detach())
    q.calibrated.fill_(True)
    return q.quantize(w.detach())


def weight_of(m: nn.Module) -> torch.Tensor:
    """``m.weight`` as a tensor (for layers typed as a plain ``nn.Module``)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(m).__name__} has no weight tensor")
    return w


def columns(m: nn.Module, repeat: int = 1) -> torch.Tensor:
    """The weight as ``(out, channels, rest)``: one slice per input channel of the layer.

    ``repeat`` input features per channel (a flatten before a linear) are folded into
    ``rest``. A depthwise conv gives ``(channels, 1, kh * kw)``.
    """
    w = weight_of(m).detach()
    if w.dim() == 2:
        return w.reshape(w.shape[0], w.shape[1] // repeat, repeat)
    return w.reshape(w.shape[0], w.shape[1], -1)


def channel_effect(m: nn.Module, vec: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Output change (per output channel) when input channel k shifts by ``vec[k]``."""
    cols = columns(m, repeat).to(torch.float64).sum(-1)  # (out, C)
    v = vec.to(torch.float64)
    if is_depthwise(m):
        return cols[:, 0] * v
    idx = group_inputs(m)
    if idx is not None:  # grouped: each row reads its own group's channels
        return (cols * v[idx]).sum(1)
    return cols @ v


def weight_shift(m: nn.Module, delta: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """``E[delta * x]`` per output channel for a weight change ``delta`` of layer ``m``."""
    d = delta.to(torch.float64)
    if d.dim() == 2:
        return d @ x_mean.to(torch.float64)
    if is_depthwise(m):
        return d.reshape(d.shape[0], -1).sum(1) * x_mean.to(torch.float64)
    idx = group_inputs(m)
    if idx is not None:  # grouped: each row reads its own group's channels
        return (d.flatten(2).sum(-1) * x_mean.to(torch.float64)[idx]).sum(1)
    return d.flatten(2).sum(-1) @ x_mean.to(torch.float64)


@torch.no_grad()
def add_bias(m: nn.Module, delta: torch.Tensor) -> None:
    """``m.bias += delta`` (creating the bias if the layer had none)."""
    d = delta.to(weight_of(m).dtype)
    if getattr(m, "bias", None) is None:
        m.bias = nn.Parameter(d.clone())
    else:
        bias = m.bias
        assert isinstance(bias, torch.Tensor)
        bias.add_(d)


@torch.no_grad()
def scale_channels(m: nn.Module, c: torch.Tensor, pair: Pair) -> None:
    """Multiply the consumer's input columns of channel k by ``c[k]``."""
    w = weight_of(m)
    cf = c.to(w.dtype)
    if pair.depthwise:
        w.mul_(cf.reshape(-1, *([1] * (w.dim() - 1))))
    elif w.dim() == 2:
        w.mul_(cf.repeat_interleave(pair.repeat).reshape(1, -1))
    else:
        w.mul_(cf.reshape(1, -1, *[1] * (w.dim() - 2)))


@torch.no_grad()
def scale_rows(m: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel k of ``m`` (weight row and bias) by ``s[k]``."""
    w = weight_of(m)
    sf = s.to(w.dtype)
    w.div_(sf.reshape(-1, *([1] * (w.dim() - 1))))
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(sf)


@torch.no_grad()
def mse_clip(
    w: torch.Tensor, bits: int, steps: int = 80, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``w`` clamped, per output channel, to the range whose rounding error is least.

    Min-max ranges waste the grid on a few large weights: at 2 bits (symmetric: ``{-1, 0,
    1} * max|w|``) most weights of a channel round to zero. Clamping to the MSE-optimal
    ``+-t`` (searched over ``t`` in ``(0.05, 1] * max|w|``) makes the min-max quantizer
    applied later use exactly that range; the weights alone decide it (no data).
    ``weights`` (shaped like ``w``) weigh each squared error, e.g. by its input's variance,
    so that the error is counted as the layer's output sees it.
    """
    flat = w.detach().reshape(w.shape[0], -1).to(torch.float64)
    wt = torch.ones_like(flat) if weights is None else weights.to(torch.float64).reshape(flat.shape)
    top = flat.abs().amax(1).clamp_min(1e-12)
    qmax = 2 ** (bits - 1) - 1
    best_err = torch.full_like(top, float("inf"))
    best_t = top.clone()
    for f in torch.linspace(0.05, 1.0, steps, dtype=torch.float64):
        t = top * f
        s = (t / qmax)[:, None]
        q = torch.ceil(flat.clamp(-t[:, None], t[:, None]) / s - 0.5).clamp(-qmax, qmax) * s
        err = (wt * (q - flat) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_t = torch.where(better, t, best_t)
    out = flat.clamp(-best_t[:, None], best_t[:, None])
    return out.reshape(w.shape).to(w.dtype)
