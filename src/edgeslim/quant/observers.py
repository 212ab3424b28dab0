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
    """Collects statistics of one tensor stream, in the quantizer's group layout.

    The sample is a uniform draw (with replacement) of every value seen, at most
    ``sample_size`` per tensor, and each batch weighs by how many values it held, so the
    first batches are not washed out by the last. Drawing indices costs O(sample), not
    O(values): a permutation of each activation tensor cost resnet20's PTQ calibration more
    than its forward passes (measured: 3.5 s of 8 s for two search measurements).
    """

    def __init__(self, sample_size: int = SAMPLE, seed: int = 0) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None  # (G, S)
        self.sample_size = sample_size
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.values = 0  # values per group observed so far
        self.exact = True  # the sample is every value seen (nothing drawn yet)

    def _draw(self, t: torch.Tensor, k: int) -> torch.Tensor:
        return t[:, torch.randint(t.shape[1], (k,), generator=self.gen)]

    def update(self, groups: torch.Tensor) -> None:
        """Observe a batch already viewed as ``(G, M)``."""
        g = groups.detach().float()
        lo, hi = torch.aminmax(g, dim=1)
        # min and max are finite only when every value is (NaN propagates through both):
        # one pass fewer than testing each value, a fifth of calibration on MobileNetV2
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            g = _saturated(g, torch.isfinite(g))
            lo, hi = torch.aminmax(g, dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        cap = max(1, self.sample_size // g.shape[0])
        n = g.shape[1]
        old, before = self.sample, self.values
        self.values += n
        self.seen += 1
        if old is None or (self.exact and old.shape[1] + n <= cap):
            self.sample = g if old is None else torch.cat([old, g], 1)
            if self.sample.shape[1] > cap:
                self.sample, self.exact = self._draw(self.sample, cap), False
            return
        size = min(cap, self.values)
        from_old = round(size * before / self.values)
        self.sample = torch.cat([self._draw(old, from_old), self._draw(g, size - from_old)], 1)
        self.exact = False

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer saw no data; run calibration batches first")
        return self.lo, self.hi

    def apply(self, quantizer: Quantizer) -> None:
        lo, hi = self.bounds()
        _set(quantizer, lo, hi, self.sample)


def _saturated(g: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``g`` with ``+-inf`` at the ends of each group's finite range and NaN at 0 in it: a
    range must be finite (an ``-inf`` mask value made the scale NaN), and quantization
    saturates such values at those ends anyway."""
    top = torch.finfo(g.dtype).max
    lo = torch.where(finite, g, top).amin(1, keepdim=True)
    hi = torch.where(finite, g, -top).amax(1, keepdim=True)
    none = lo > hi  # a group with no finite value at all
    lo, hi = lo.masked_fill(none, 0.0), hi.masked_fill(none, 0.0)
    g = torch.where(g == float("inf"), hi, torch.where(g == float("-inf"), lo, g))
    return torch.where(torch.isnan(g), torch.zeros_like(g).clamp(lo, hi), g)


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
        hi = upper_quantile(s, self.q)
        lo = -upper_quantile(-s, self.q)
        lo = torch.where(lo_seen >= 0, torch.zeros_like(lo), lo)  # keep ReLU outputs at 0
        _set(quantizer, lo, hi, s)


def upper_quantile(s: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(s, q, dim=1)`` (linear interpolation) for ``q`` near 1, from the
    row's top values only: a partial selection instead of sorting every row (the sort was
    a third of resnet20's PTQ calibration)."""
    n = s.shape[1]
    pos = q * (n - 1)
    below = int(pos)
    k = n - below  # the order statistics ``below`` and ``below + 1`` are among the top k
    if k > n // 2:
        return torch.quantile(s, q, dim=1)
    top = torch.topk(s, k, dim=1, sorted=True).values  # descending
    lower = top[:, k - 1]
    upper = top[:, max(k - 2, 0)]
    return lower + (upper - lower) * (pos - below)


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
