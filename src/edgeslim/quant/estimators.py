"""Gradient estimators: how gradients pass through a quantizer's rounding.

Estimators only use the generic quantizer interface (``quantize``, ``levels``,
``to_groups``/``from_groups``), so any estimator composes with any quantizer. The hard ones
(ste, clipped_ste, lsq, pact, nbq at the end) return ``quantizer.quantize(x)`` plus
zero-valued gradient carriers ``t - t.detach()``: the forward value is bit-equal to the hard
quantizer and the backward is exactly the estimator's rule. The smooth ones (aqe, tanh)
return a differentiable surrogate that sharpens with ``progress`` and becomes the hard
quantizer (forward) at progress 1.

Range gradients (lsq, pact) reach the quantizer's range tensor through ``levels()``, which
is differentiable in it: for ``homogeneous`` quantizers (levels = s·u, u fixed) the chosen
level contributes ``u = q/s`` per element; for a codebook each centroid receives the summed
gradient of the elements assigned to it (Deep Compression's centroid update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from edgeslim.quant.base import Quantizer
from edgeslim.quant.registries import ESTIMATORS


def _carrier(t: torch.Tensor) -> torch.Tensor:
    """Zero in value, identity in gradient."""
    return t - t.detach()


@dataclass
class _Parts:
    """``x`` in group layout with its levels, nearest-level index and hard value."""

    g: torch.Tensor  # (G, M), differentiable view of x
    lv: torch.Tensor  # (G, L) levels, differentiable in the range tensor
    idx: torch.Tensor  # (G, M) index of the nearest level
    inside: torch.Tensor  # (G, M) bool: min level <= x <= max level
    q: torch.Tensor  # hard quantize(x), shape of x, detached


def _parts(quantizer: Quantizer, x: torch.Tensor) -> _Parts:
    g = quantizer.to_groups(x)
    lv = quantizer.levels().to(g.dtype)
    if lv.shape[0] == 1 and g.shape[0] != 1:
        lv = lv.expand(g.shape[0], -1)
    lvd, gd = lv.detach(), g.detach()
    idx = torch.searchsorted(((lvd[:, 1:] + lvd[:, :-1]) / 2).contiguous(), gd.contiguous())
    inside = (gd >= lvd[:, :1]) & (gd <= lvd[:, -1:])
    return _Parts(g, lv, idx, inside, quantizer.quantize(x).detach())


def _schedule(k0: float, k_max: float, p: float) -> float:
    """Geometric sharpening ``k0 (k_max/k0)^p`` (MINW-Net's ``k_e = k0 r^e`` in progress)."""
    return k0 * (k_max / k0) ** p


def _safe_gaps(lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaps ``d``, thresholds ``t`` and gaps floored at 1e-6 of the group's span (so that
    duplicate codebook centroids or sub-normal power-of-two levels give no 0/0)."""
    d = lv[:, 1:] - lv[:, :-1]
    t = (lv[:, 1:] + lv[:, :-1]) / 2
    span = (lv[:, -1:] - lv[:, :1]).detach()
    return d, t, d.clamp_min(1e-6 * span + 1e-30).detach()


class EstimatorBase:
    """Progress bookkeeping and the ``prepare`` hook (called once before training)."""

    HARD: ClassVar[bool] = False  # the forward value is quantize(x) at any progress
    # the surrogate keeps a window of thresholds per element for the backward pass (AQE):
    # memory and time many times a hard estimator's on large tensors such as activations
    WINDOWED: ClassVar[bool] = False

    def __init__(self) -> None:
        # Decision: a new estimator stands at the end of its schedule (the hard quantizer,
        # which the exported file computes); training that follows a schedule drives it from
        # 0 (:func:`edgeslim.quant.set_progress` per step). Why: at 0 an AQE/tanh/n-BQ layer
        # nobody trained computed a smooth surrogate (n-BQ: the float weights), so a recipe's
        # quantize stage with `estimator: nbq` measured and saved an unquantized model.
        self.progress = 1.0

    def set_progress(self, p: float) -> None:
        self.progress = min(max(float(p), 0.0), 1.0)

    def prepare(self, quantizer: Quantizer) -> None:
        """Hook run before training; the default does nothing."""

    def forward_is_hard(self) -> bool:
        """Whether the forward value is exactly ``quantizer.quantize(x)`` now (the gradient
        carriers only add zeros), so a caller that needs no gradient may skip them
        (:func:`estimate`)."""
        return self.HARD

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(progress={self.progress:.3f})"


class STE(EstimatorBase):
    """Straight-through: forward ``quantize(x)``, gradient 1 everywhere."""

    HARD = True

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        return quantizer.quantize(x).detach() + _carrier(x)


class ClippedSTE(EstimatorBase):
    """Straight-through inside ``[min level, max level]`` of the element's group, zero
    gradient outside (the saturated part of the quantizer is flat)."""

    HARD = True

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        p = _parts(quantizer, x)
        return p.q + quantizer.from_groups(p.inside * _carrier(p.g), x)


def _range_tensor(quantizer: Quantizer) -> torch.Tensor:
    t = getattr(quantizer, "range_param", None)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"a homogeneous quantizer must expose range_param; got {quantizer!r}")
    return t


def _make_learnable(quantizer: Quantizer, who: str) -> None:
    fn = getattr(quantizer, "make_learnable", None)
    if fn is None:
        raise TypeError(f"{who} needs a quantizer with make_learnable(); got {quantizer!r}")
    fn()


class LSQ(EstimatorBase):
    """Learned step size (Esser et al. 2020) through the quantizer's range tensor.

    Uniform (and every homogeneous quantizer, levels ``s·u``): exact LSQ,
    ``y = s · Q_u(x/s)`` with STE on the rounding, i.e. ``dy/dx = 1`` inside the range and 0
    outside, ``dy/ds = u - x/s`` inside and ``u`` outside, ``u = q/s`` the unit level. This
    is LSQ's formula for the integer grid and the same derivation for power-of-two, binary
    and ternary unit level sets. Codebooks: each centroid gets the summed gradient of its
    elements. The range gradient is multiplied by ``1/sqrt(M·Qp)`` (LSQ's gradient scale),
    M the elements per group, Qp the largest unit level magnitude (qmax for uniform, 1 for
    pow2/binary/ternary, 1 by convention for codebooks).

    ``prepare`` makes the range a Parameter; if it was not called, the first call does it
    (then the optimizer must be built after the first forward).
    """

    HARD = True

    def prepare(self, quantizer: Quantizer) -> None:
        _make_learnable(quantizer, "lsq")

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(getattr(quantizer, "range_param", None), torch.nn.Parameter):
            self.prepare(quantizer)
        p = _parts(quantizer, x)
        level_grad = _carrier(torch.gather(p.lv, 1, p.idx))
        m = p.g.shape[1]
        if getattr(quantizer, "homogeneous", False):
            s = _range_tensor(quantizer)
            s_pos = s.detach().clamp_min(1e-8).to(p.g.dtype)[:, None]
            qp = (p.lv.detach().abs().amax(1, keepdim=True) / s_pos).clamp_min(1.0)
            step_grad = -(p.inside * p.g.detach() / s_pos) * _carrier(s.to(p.g.dtype))[:, None]
            range_grad = (level_grad + step_grad) / torch.sqrt(m * qp)
        else:
            range_grad = level_grad / math.sqrt(m)
        return p.q + quantizer.from_groups(p.inside * _carrier(p.g) + range_grad, x)


class PACT(EstimatorBase):
    """Learned clip (Choi et al. 2018): ``y = Q(clamp(x, lo, α))`` with STE on Q.

    ``dy/dx`` = 1 inside the range, 0 outside; the clip gets gradient only from clipped
    elements: ``dy/dα = 1`` above α (PACT's rule). α is the quantizer's top level, so the
    gradient reaches the range tensor through ``levels()``: ``qmax·ds`` for uniform
    (α = qmax·s), ``ds`` for pow2/binary/ternary (clip at ±α), the outer centroids for a
    codebook. Elements below the lowest level feed it symmetrically (weights: clip at ±α;
    for unsigned activations the lowest level is 0 and contributes nothing). No gradient
    scaling; PACT's L2 penalty on α belongs in the loss.
    """

    HARD = True

    def prepare(self, quantizer: Quantizer) -> None:
        _make_learnable(quantizer, "pact")

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(getattr(quantizer, "range_param", None), torch.nn.Parameter):
            self.prepare(quantizer)
        p = _parts(quantizer, x)
        clip_grad = ~p.inside * _carrier(torch.gather(p.lv, 1, p.idx))
        return p.q + quantizer.from_groups(p.inside * _carrier(p.g) + clip_grad, x)


class SharpeningEstimator(EstimatorBase):
    """A smooth surrogate of the quantizer whose sharpness ``k`` follows training progress.

    ``k(p) = k0 (k_max/k0)^p``. Before the end the forward *is* the surrogate (exact
    derivative, no STE); at p = 1 the forward is ``quantize(x)`` and the gradient that of
    the sharpest surrogate. Subclasses define ``surrogate``.
    """

    def __init__(self, k0: float = 1.0, k_max: float = 100.0) -> None:
        super().__init__()
        self.k0, self.k_max = k0, k_max

    @property
    def k(self) -> float:
        return _schedule(self.k0, self.k_max, self.progress)

    def surrogate(self, quantizer: Quantizer, x: torch.Tensor, k: float) -> torch.Tensor:
        raise NotImplementedError

    def forward_is_hard(self) -> bool:
        return self.progress >= 1.0

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        f = self.surrogate(quantizer, x, self.k)
        if self.progress >= 1.0:
            return quantizer.quantize(x).detach() + _carrier(f)
        return f


class AQE(SharpeningEstimator):
    """MINW-Net asymptotic quantized estimator: a smooth staircase that sharpens.

    ``f_k(x) = l_0 + Σ_i d_i · ½(1 + tanh(k (x - t_i) / d_i))`` over the group's levels
    ``l_i``, gaps ``d_i = l_{i+1} - l_i`` and midpoints ``t_i``; dividing by ``d_i`` makes k
    scale-free (k = 1: nearly the identity inside the range, slope ≈ 1; large k: the hard
    staircase). Forward and backward use ``f_k`` itself (no STE). With more than ``window``
    thresholds (5+ bits) only the ``window`` nearest to x are summed and the rest saturated
    to 0/1: with even spacing (uniform) the truncation is below float error (~1e-5 of a gap
    at 8 bits, k >= 1). With geometric spacing (pow2 at 6+ bits) the far, wider gaps are not
    yet saturated at k ~ 1 and the truncation reaches ~0.1 of the largest gap; it is < 1e-6
    from k = 10 on. Raise ``window`` for an exact sum at a memory cost of ``window`` floats
    per element.

    ``k(p) = k0 (k_max/k0)^p``, defaults 1 -> 100. At p = 1 the forward is the limit
    ``quantize(x)`` exactly (``f_100`` is within 1e-3·d of it except within 0.04·d of a
    threshold) and the gradient is that of ``f_100``.
    """

    WINDOWED: ClassVar[bool] = True

    def __init__(self, k0: float = 1.0, k_max: float = 100.0, window: int = 16) -> None:
        super().__init__(k0, k_max)
        self.window = window

    def surrogate(self, quantizer: Quantizer, x: torch.Tensor, k: float) -> torch.Tensor:
        """``f_k(x)`` (shape of x), differentiable in x and in the levels."""
        p = _parts(quantizer, x)
        d, t, d_safe = _safe_gaps(p.lv)
        n_thr = d.shape[1]
        n = min(n_thr, self.window)
        start = (p.idx - n // 2).clamp(0, n_thr - n)  # (G, M): first threshold summed
        win = start[..., None] + torch.arange(n, device=start.device)  # (G, M, n)
        rows = torch.arange(d.shape[0], device=start.device)[:, None, None]
        z = k * (p.g[..., None] - t[rows, win]) / d_safe[rows, win]
        steps = (d[rows, win] * 0.5 * (1 + torch.tanh(z))).sum(-1)
        return quantizer.from_groups(torch.gather(p.lv, 1, start) + steps, x)


class TanhSoftRound(SharpeningEstimator):
    """Soft rounding with tanh (DSQ form), per interval between adjacent levels.

    For x in ``[l_i, l_{i+1}]`` (clamped to the level range), with centre ``t_i`` and width
    ``d_i``: ``r(x) = t_i + (d_i/2) tanh(k (x - t_i)/d_i) / tanh(k/2)``. r is continuous,
    passes through every level, is the identity as k -> 0 and the staircase as k -> ∞;
    the gap ``|r - quantize|`` shrinks monotonically in k for every x. The centre must be
    the midpoint *between* levels: centred on the nearest level the same formula would push
    values toward the thresholds. k is scale-free (in units of the gap) and follows the AQE
    schedule; at p = 1 the forward is ``quantize(x)`` and the gradient that of ``r_kmax``.
    Gradient is zero outside the level range (the clamp).
    """

    def surrogate(self, quantizer: Quantizer, x: torch.Tensor, k: float) -> torch.Tensor:
        p = _parts(quantizer, x)
        d, t, d_safe = _safe_gaps(p.lv)
        gc = torch.minimum(torch.maximum(p.g, p.lv[:, :1]), p.lv[:, -1:])
        lvd = p.lv.detach().contiguous()
        i = (torch.searchsorted(lvd, gc.detach().contiguous(), right=True) - 1).clamp(
            0, d.shape[1] - 1
        )
        ti, di = t.gather(1, i), d.gather(1, i)
        r = ti + di / 2 * torch.tanh(k * (gc - ti) / d_safe.gather(1, i)) / math.tanh(k / 2)
        return quantizer.from_groups(r, x)


class NBQBlend(EstimatorBase):
    """n-BQ-NN blend ``y = (1 - λ) x + λ · ste(Q(x))`` with ``λ = progress``: training starts
    in float and ends quantized; the gradient is 1 throughout."""

    def forward_is_hard(self) -> bool:
        return self.progress >= 1.0

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        hard = quantizer.quantize(x).detach() + _carrier(x)
        lam = self.progress
        if lam >= 1.0:
            return hard
        return (1 - lam) * x + lam * hard


def estimate(estimator: Any, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """``estimator(quantizer, x)``, or ``quantizer.quantize(x)`` alone when autograd is not
    recording and the estimator's forward is hard (value-equal; the carriers and, for
    lsq/pact/clipped_ste, the nearest-level search are skipped). Every evaluation of a
    fake-quantized model (PTQ scoring, a search's measurements) runs this way: measured on
    resnet20 at batch 500, one thread, the STE call and its carriers were 0.4 of 2.2 s of
    fake quantization in a 4.6 s measurement (ad hoc, 2026-12-04). Estimators that do not
    derive from :class:`EstimatorBase` are always called."""
    hard = getattr(estimator, "forward_is_hard", None)
    if hard is not None and not torch.is_grad_enabled() and hard():
        return quantizer.quantize(x)
    out = estimator(quantizer, x)
    assert isinstance(out, torch.Tensor)
    return out


ESTIMATORS.register("ste", STE)
ESTIMATORS.register("clipped_ste", ClippedSTE)
ESTIMATORS.register("lsq", LSQ)
ESTIMATORS.register("pact", PACT)
ESTIMATORS.register("aqe", AQE)
ESTIMATORS.register("tanh", TanhSoftRound)
ESTIMATORS.register("nbq", NBQBlend)
