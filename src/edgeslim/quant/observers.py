"""Observers: how a quantizer's range is chosen from data (PTQ calibration).

An observer sees activation batches (or a weight tensor once) and then sets the range of a
quantizer. It keeps exact per-group min/max plus a bounded uniform sample of the values,
so percentile and MSE searches cost the same whatever the calibration set size.

- ``minmax``: the full observed range.
- ``percentile``: the 0.01%/99.99% quantiles (clips rare outliers).
- ``dynamic``: no calibration; the activation quantizer takes its range from every tensor
  it sees (see :class:`edgeslim.quant.modules.ActQuant`).
- ``mse``: the clip ratio (of the min/max range, per group) minimising the quantization
  mean-squared error on the sample; 24 ratios from 0.3 to 1.
- ``mse_wide``: the same search over 48 ratios from 0.02 to 1. For 1-bit activations, whose
  single threshold belongs far below the maximum: on resnet20 the 0.3 floor (or the 99.99%
  percentile) sets it so high that almost every activation becomes 0 and QAT starts from
  chance. At 2 bits and more the narrower searches start QAT better, so they stay default.
"""

from __future__ import annotations

import torch

from edgeslim.quant.base import Quantizer
from edgeslim.quant.registries import OBSERVERS

SAMPLE = 1 << 18


class Observer:
    """Collects statistics of one tensor stream, in the quantizer's group layout."""

    def __init__(self, sample_size: int = SAMPLE, seed: int = 0) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None  # (G, S)
        self.sample_size = sample_size
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0

    def update(self, groups: torch.Tensor) -> None:
        """Observe a batch already viewed as ``(G, M)``."""
        g = groups.detach().float()
        lo, hi = g.amin(1), g.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        per_group = max(1, self.sample_size // g.shape[0])
        take = min(g.shape[1], per_group)
        idx = torch.randperm(g.shape[1], generator=self.gen)[:take]
        part = g[:, idx]
        self.sample = part if self.sample is None else torch.cat([self.sample, part], 1)
        if self.sample.shape[1] > per_group:
            keep = torch.randperm(self.sample.shape[1], generator=self.gen)[:per_group]
            self.sample = self.sample[:, keep]
        self.seen += 1

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer saw no data; run calibration batches first")
        return self.lo, self.hi

    def apply(self, quantizer: Quantizer) -> None:
        lo, hi = self.bounds()
        _set(quantizer, lo, hi, self.sample)


def _set(q: Quantizer, lo: torch.Tensor, hi: torch.Tensor, sample: torch.Tensor | None) -> None:
    set_range = getattr(q, "set_range", None)
    if callable(set_range):
        set_range(lo, hi)
    elif sample is not None:
        q.init_range(sample.reshape(-1) if not q.is_weight else sample)
    q.calibrated.fill_(True)


class MinMaxObserver(Observer):
    pass


class PercentileObserver(Observer):
    def __init__(self, q: float = 0.9999, **kw: int) -> None:
        super().__init__(**kw)
        self.q = q

    def apply(self, quantizer: Quantizer) -> None:
        assert self.sample is not None
        s = self.sample
        lo_seen, _ = self.bounds()
        hi = torch.quantile(s, self.q, dim=1)
        lo = torch.quantile(s, 1 - self.q, dim=1)
        lo = torch.where(lo_seen >= 0, torch.zeros_like(lo), lo)  # keep ReLU outputs at 0
        _set(quantizer, lo, hi, s)


class MSEObserver(Observer):
    def __init__(self, ratios: int = 24, low: float = 0.3, **kw: int) -> None:
        super().__init__(**kw)
        self.ratios = torch.linspace(low, 1.0, ratios)

    def apply(self, quantizer: Quantizer) -> None:
        lo, hi = self.bounds()
        s = self.sample
        set_range = getattr(quantizer, "set_range", None)
        if s is None or not callable(set_range):
            _set(quantizer, lo, hi, s)
            return
        best_err = torch.full_like(lo, float("inf"))
        best = torch.ones_like(lo)
        for r in self.ratios:
            set_range(lo * r, hi * r)
            err = (_quantize_groups(quantizer, s) - s).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, r, best)
        _set(quantizer, lo * best, hi * best, s)


def _quantize_groups(q: Quantizer, groups: torch.Tensor) -> torch.Tensor:
    """Hard-quantize a ``(G, S)`` sample group by group with the quantizer's levels."""
    lv = q.levels().to(groups.dtype)
    if lv.shape[0] == 1 and groups.shape[0] != 1:
        lv = lv.expand(groups.shape[0], -1)
    mid = (lv[:, 1:] + lv[:, :-1]) / 2
    idx = torch.searchsorted(mid.contiguous(), groups.contiguous())
    return torch.gather(lv, 1, idx)


OBSERVERS.register("minmax", MinMaxObserver)
OBSERVERS.register("percentile", PercentileObserver)
OBSERVERS.register("mse", MSEObserver)


@OBSERVERS.register("mse_wide")
class WideMSEObserver(MSEObserver):
    def __init__(self, **kw: int) -> None:
        super().__init__(ratios=48, low=0.02, **kw)


@OBSERVERS.register("dynamic")
class DynamicObserver(Observer):
    """Calibration is a no-op: the range is recomputed from each tensor at run time."""

    def update(self, groups: torch.Tensor) -> None:
        self.seen += 1

    def apply(self, quantizer: Quantizer) -> None:
        quantizer.calibrated.fill_(True)
