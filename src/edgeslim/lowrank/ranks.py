"""Which layers can be factorized, and at what rank.

Two rules, both from the singular values of each layer's weight matrix:

- **energy** ``e``: per layer the smallest rank whose squared singular values hold ``e`` of
  the total (the usual rule, and TRP's truncation rule);
- **MACs target** ``rho``: the ranks that remove ``rho`` of the whole model's MACs while
  losing the least energy summed over layers (see :func:`ranks_for_target`).

A layer whose rank gives no MACs saving (``rank (in + out) >= in out``) is left dense, with
that reason.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from edgeslim.graph.layers import LayerInfo
from edgeslim.lowrank.modules import (
    FACTORIZABLE_TYPES,
    LOW_RANK_TYPES,
    Factorizable,
    LowRankError,
    weight_matrix,
    why_not_factorizable,
)


@dataclass
class Candidate:
    """A factorizable layer with its SVD and its dense MACs in the example forward."""

    fqn: str
    module: Factorizable
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    macs: int
    cum_energy: torch.Tensor  # cum_energy[r - 1]: fraction of squared singular values at rank r

    @property
    def shape(self) -> tuple[int, int]:
        u, _, vh = self.svd
        return int(u.shape[0]), int(vh.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.svd[1].numel())

    def numerical_rank(self) -> int:
        """Singular values above ``max(m, n) * eps(float32) * s_max`` (the weights are fp32)."""
        s = self.svd[1]
        tol = max(self.shape) * torch.finfo(torch.float32).eps * float(s[0]) if s.numel() else 0
        return int((s > tol).sum())

    def energy_at(self, rank: int) -> float:
        return float(self.cum_energy[rank - 1])

    def macs_at(self, rank: int) -> int:
        """MACs of the two factor layers at ``rank`` (same output positions as the dense)."""
        out, inner = self.shape
        positions = self.macs // (out * inner)
        return positions * rank * (inner + out)


def matches(fqn: str, pattern: str) -> bool:
    """An exact FQN, a glob (``layer1.*``) or a ``re:`` regular expression (searched)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    return fqn == pattern or fnmatch.fnmatchcase(fqn, pattern)


def candidates(
    model: nn.Module, table: Mapping[str, LayerInfo], skip: Iterable[str] = ()
) -> tuple[list[Candidate], dict[str, str]]:
    """The layers that can be factorized, each with its SVD, and ``{fqn: reason}`` for the
    conv/linear layers that cannot (grouped, skipped by a pattern, not run, already low-rank).
    """
    skip = tuple(skip)
    found: list[Candidate] = []
    left: dict[str, str] = {}
    inside: tuple[str, ...] = ()
    for fqn, module in model.named_modules():
        if isinstance(module, LOW_RANK_TYPES):
            inside = (*inside, fqn + ".")
            continue
        if not fqn or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        if fqn.startswith(inside):
            continue  # already a factor of a low-rank layer
        reason = why_not_factorizable(module)
        if reason is None and any(matches(fqn, p) for p in skip):
            reason = "skipped by request"
        if reason is None and (fqn not in table or table[fqn].macs == 0):
            reason = "not run by the example inputs"
        if reason is None and not torch.isfinite(module.weight).all():
            raise LowRankError(f"layer {fqn} has NaN or Inf weights; nothing was factorized")
        if reason is not None:
            left[fqn] = reason
            continue
        assert isinstance(module, FACTORIZABLE_TYPES)
        u, s, vh = torch.linalg.svd(weight_matrix(module), full_matrices=False)
        if float(s.square().sum()) == 0.0:
            left[fqn] = "all-zero weight"
            continue
        found.append(Candidate(fqn, module, (u, s, vh), table[fqn].macs, cumulative_energy(s)))
    return found, left


def rank_for_energy(cum_energy: torch.Tensor, energy: float) -> int:
    """The smallest rank whose cumulative energy fraction (float64, ``cum[r - 1]`` at rank
    ``r``) reaches ``energy``."""
    tol = 1e-12  # cumulative sums of an exact rank-r matrix reach 1 only up to rounding
    r = int(torch.searchsorted(cum_energy, torch.tensor(energy - tol, dtype=torch.float64)))
    return min(r + 1, int(cum_energy.numel()))


def cumulative_energy(s: torch.Tensor) -> torch.Tensor:
    """``cum[r - 1]``: the fraction of the squared singular values ``s`` kept at rank ``r``."""
    sq = s.to(torch.float64).square()
    return sq.cumsum(0) / sq.sum().clamp_min(torch.finfo(torch.float64).tiny)


def energy_rank(cand: Candidate, energy: float, round_to: int = 1) -> int:
    """The smallest rank keeping ``energy`` of the squared singular values, rounded up to a
    multiple of ``round_to`` (capped at the full rank)."""
    r = rank_for_energy(cand.cum_energy, energy)
    return min(cand.max_rank, math.ceil(r / round_to) * round_to)


def ranks_at(
    cands: list[Candidate], energy: float, round_to: int = 1
) -> tuple[dict[str, int], dict[str, str]]:
    """``{fqn: rank}`` of the layers worth factorizing at ``energy``, and ``{fqn: reason}``
    for those left dense because their rank saves no MACs."""
    ranks: dict[str, int] = {}
    dense: dict[str, str] = {}
    for c in cands:
        r = energy_rank(c, energy, round_to)
        if c.macs_at(r) < c.macs:
            ranks[c.fqn] = r
        else:
            dense[c.fqn] = (
                f"rank {r} of {c.max_rank} (energy {energy:.4g}) saves no MACs "
                f"({c.macs_at(r):,} factorized vs {c.macs:,} dense); left dense"
            )
    return ranks, dense


def given_ranks(
    cands: list[Candidate], ranks: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, str]]:
    """The given ``{fqn: rank}`` where it saves MACs; ``{fqn: reason}`` for the rest."""
    chosen: dict[str, int] = {}
    dense: dict[str, str] = {}
    for c in cands:
        r = ranks.get(c.fqn)
        if r is None:
            dense[c.fqn] = "no rank given; left dense"
        elif not 1 <= r <= c.max_rank:
            raise LowRankError(f"rank {r} for {c.fqn} is outside [1, {c.max_rank}]")
        elif c.macs_at(r) < c.macs:
            chosen[c.fqn] = r
        else:
            dense[c.fqn] = (
                f"rank {r} of {c.max_rank} saves no MACs ({c.macs_at(r):,} factorized vs "
                f"{c.macs:,} dense); left dense"
            )
    return chosen, dense


def _options(cand: Candidate, round_to: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The ranks worth factorizing at (multiples of ``round_to`` or the full rank, fewer MACs
    than dense), their energy lost and their MACs."""
    ranks = sorted({*range(round_to, cand.max_rank + 1, round_to), cand.max_rank})
    ranks = [r for r in ranks if cand.macs_at(r) < cand.macs]
    lost = torch.tensor([1.0 - cand.energy_at(r) for r in ranks], dtype=torch.float64)
    macs = torch.tensor([cand.macs_at(r) for r in ranks], dtype=torch.float64)
    return ranks, lost, macs


def _choose(
    options: list[tuple[list[int], torch.Tensor, torch.Tensor]], cands: list[Candidate], mu: float
) -> tuple[dict[str, int], int]:
    """Each layer's option minimising ``energy lost + mu * MACs`` (dense: no loss, its MACs);
    returns the ranks and the MACs saved."""
    ranks: dict[str, int] = {}
    saved = 0
    for c, (rs, lost, macs) in zip(cands, options, strict=True):
        if not rs:
            continue
        cost = lost + mu * macs
        i = int(cost.argmin())
        if float(cost[i]) < mu * c.macs:
            ranks[c.fqn] = rs[i]
            saved += c.macs - c.macs_at(rs[i])
    return ranks, saved


def _fill(
    cands: list[Candidate],
    options: list[tuple[list[int], torch.Tensor, torch.Tensor]],
    ranks: dict[str, int],
    slack: float,
) -> dict[str, int]:
    """Spend the MACs the Lagrangian choice saved beyond the target (its options jump in
    steps): repeatedly raise the layer whose next larger option (a higher rank, or dense)
    buys back the most energy per MAC and still fits."""
    ranks = dict(ranks)
    while True:
        best: tuple[float, str, int | None, float] | None = None
        for c, (rs, lost, macs) in zip(cands, options, strict=True):
            r = ranks.get(c.fqn)
            if r is None:
                continue  # dense already
            i = rs.index(r)
            if i + 1 < len(rs):
                step: tuple[int | None, float, float] = (
                    rs[i + 1],
                    float(macs[i + 1] - macs[i]),
                    float(lost[i] - lost[i + 1]),
                )
            else:
                step = (None, float(c.macs - macs[i]), float(lost[i]))
            nxt, cost, gain = step
            if cost <= slack and (best is None or gain / max(cost, 1.0) > best[0]):
                best = (gain / max(cost, 1.0), c.fqn, nxt, cost)
        if best is None:
            return ranks
        _, fqn, nxt, cost = best
        if nxt is None:
            del ranks[fqn]
        else:
            ranks[fqn] = nxt
        slack -= cost


def ranks_for_target(
    cands: list[Candidate], macs_before: int, reduction: float, round_to: int = 1
) -> tuple[dict[str, int], dict[str, str]]:
    """Ranks removing at least ``reduction`` of ``macs_before`` while losing the least
    energy summed over layers (each layer's lost fraction of its squared singular values).

    Decision — a Lagrangian choice, not one energy threshold shared by every layer: each
    layer takes the option minimising ``lost + mu * MACs`` and ``mu`` is bisected to the
    smallest value that meets the target, so at the margin every layer gives up the same
    energy per MAC saved. On resnet20 (Fashion-MNIST, no fine-tuning, 1,000 test images) a
    shared threshold kept 75.5% top-1 at -30% MACs and 28.3% at -50%; this rule 88.3% and
    60.0%: the shared threshold spent the first conv's few MACs at a high price in error.
    The MACs saved beyond the target (the choices jump in steps) are then spent back,
    greedily, on the layers that regain the most energy per MAC.
    Raises :class:`LowRankError` when even the smallest ranks cannot meet the target.
    """
    need = reduction * macs_before
    options = [_options(c, round_to) for c in cands]
    hi = 1.0  # errors are <= 1 per layer, so at mu = 1 every layer takes its fewest MACs
    ranks, saved = _choose(options, cands, hi)
    if saved < need:
        floor = macs_before - saved
        raise LowRankError(
            f"a -{reduction:.1%} MACs target cannot be reached by factorization: with the "
            f"smallest rank (round_to={round_to}) in every one of the {len(cands)} "
            f"factorizable layers the model keeps {floor:,} of {macs_before:,} MACs "
            f"(-{1 - floor / macs_before:.1%}); the rest is in layers that cannot be "
            "factorized or needs pruning instead"
        )
    lo = 1e-18
    for _ in range(120):  # bisection in log space: mu spans many decades
        mid = (lo * hi) ** 0.5
        if _choose(options, cands, mid)[1] >= need:
            hi = mid
        else:
            lo = mid
    ranks, saved = _choose(options, cands, hi)
    ranks = _fill(cands, options, ranks, saved - need)
    dense = {
        c.fqn: f"left dense: at -{reduction:.1%} MACs its ranks cost more energy per MAC "
        "saved than the other layers'"
        for c in cands
        if c.fqn not in ranks
    }
    return ranks, dense
