"""The quantizer and estimator plug points.

A :class:`Quantizer` owns *what values a tensor may take*: a sorted set of levels per
group (one group per tensor, per channel or per block of a channel), its range parameters
(scale, zero point, clip, codebook) and the hard rounding to the nearest level. An
:class:`Estimator` owns *how gradients pass* through that rounding. Any quantizer composes
with any estimator because estimators only use the quantizer's generic interface:
``quantize`` (hard), ``levels`` (per group) and ``to_groups``/``from_groups``.

Tensors are viewed as ``(G, M)``: G groups of M elements. Weights of shape ``(C_out, ...)``
give G = 1 (tensor), G = C_out (channel) or G = C_out * ceil(K / group_size) (group, K the
elements per output channel, zero-padded to a multiple of group_size).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from edgeslim.quant.spec import QuantConfigError, QuantInputError, QuantSpec


class Quantizer(nn.Module):
    """Base quantizer; subclasses set range parameters and implement ``levels``.

    ``calibrated`` is False until ``init_range`` (from an observer or the data itself) ran.
    ``learnable`` range parameters (LSQ's step, PACT's clip) are ``nn.Parameter``s.
    """

    calibrated: torch.Tensor

    def __init__(self, spec: QuantSpec, is_weight: bool = True) -> None:
        super().__init__()
        if is_weight and spec.granularity == "token":
            raise QuantConfigError(
                "granularity 'token' groups an activation by its last dimension; weights take "
                "tensor, channel or group"
            )
        self.spec = spec
        self.bits = spec.bits
        self.is_weight = is_weight
        self.register_buffer("calibrated", torch.tensor(False))
        self._shape: tuple[int, ...] | None = None
        self._pad = 0

    # --- grouping -------------------------------------------------------------------
    def num_groups(self, x: torch.Tensor) -> int:
        g = self.spec.granularity
        if g == "token" and not self.is_weight:
            return int(x.numel() // x.shape[-1])
        if g == "tensor" or not self.is_weight:
            return 1
        if g == "channel":
            return int(x.shape[0])
        per = x[0].numel()
        return int(x.shape[0]) * math.ceil(per / self.spec.group_size)

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``(G, M)`` (activations: one group, or one per token)."""
        g = self.spec.granularity
        no_dim = g == "token" or (self.is_weight and g != "tensor")
        if isinstance(x, torch.Tensor) and (  # not under fx tracing (a Proxy has no size)
            x.numel() == 0 or (x.dim() == 0 and no_dim)
        ):
            raise QuantInputError(
                f"cannot quantize a tensor of shape {list(x.shape)} with granularity {g!r}: "
                + ("it is empty" if x.numel() == 0 else "it has no channel dimension")
            )
        if g == "token" and not self.is_weight:
            return x.reshape(-1, x.shape[-1])
        if g == "tensor" or not self.is_weight:
            return x.reshape(1, -1)
        if g == "channel":
            return x.reshape(x.shape[0], -1)
        flat = x.reshape(x.shape[0], -1)
        gs = self.spec.group_size
        pad = (-flat.shape[1]) % gs
        if pad:
            flat = nn.functional.pad(flat, (0, pad))
        return flat.reshape(-1, gs)

    def from_groups(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups`."""
        if self.spec.granularity == "group" and self.is_weight:
            per = like[0].numel()
            y = y.reshape(like.shape[0], -1)[:, :per]
        return y.reshape(like.shape)

    # --- the interface subclasses implement ---------------------------------------------
    def init_range(self, x: torch.Tensor) -> None:
        """Set range parameters from ``x`` (weights: the tensor itself; activations: a
        calibration statistic chosen by the observer)."""
        raise NotImplementedError

    def levels(self) -> torch.Tensor:
        """Sorted representable values per group, shape ``(G, L)`` (or ``(1, L)``)."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Hard fake-quant: every element replaced by its nearest level (same shape as x).

        The default works from :meth:`levels`; subclasses override it with a closed form.
        """
        g = self.to_groups(x)
        lv = self.levels().to(g.dtype)
        if lv.shape[0] == 1 and g.shape[0] != 1:
            lv = lv.expand(g.shape[0], -1)
        mid = (lv[:, 1:] + lv[:, :-1]) / 2
        idx = torch.searchsorted(mid.contiguous(), g.contiguous())
        return self.from_groups(torch.gather(lv, 1, idx), x)

    def int8_scale(self) -> torch.Tensor | None:
        """The per-group scale under which every level is an integer code of int8 (what a
        QDQ file stores: ``level = code * scale``), or None when the levels are no such grid
        (a codebook's centroids). Subclasses with a scaled integer grid override it."""
        return None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer index (0..L-1) of each element's level, in ``to_groups`` layout."""
        g = self.to_groups(x)
        lv = self.levels().to(g.dtype)
        if lv.shape[0] == 1 and g.shape[0] != 1:
            lv = lv.expand(g.shape[0], -1)
        mid = (lv[:, 1:] + lv[:, :-1]) / 2
        return torch.searchsorted(mid.contiguous(), g.contiguous())

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.quantizer}, bits={s.bits}, {s.granularity}, estimator={s.estimator}"


@runtime_checkable
class Estimator(Protocol):
    """Differentiable forward through a quantizer: ``estimator(quantizer, x) -> x_q``.

    ``set_progress(p)`` with p in [0, 1] (fraction of training done) drives schedules
    (AQE sharpening, the n-BQ blend); at p = 1 every estimator's output equals
    ``quantizer.quantize(x)`` up to float error.
    """

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor: ...

    def set_progress(self, p: float) -> None: ...
