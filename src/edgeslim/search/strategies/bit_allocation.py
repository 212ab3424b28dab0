"""``greedy`` and ``dp``: allocation from per-coordinate sensitivity (GBA-style).

Both first measure sensitivity once: the least compressed policy, then one probe per
coordinate with only that coordinate at its most compressed choice (a layer at its lowest
bits, a group at its smallest keep ratio). A coordinate's sensitivity is the validation
loss increase of its probe (the metric drop when no loss is measured). Intermediate
choices are interpolated, as the probes would be too many otherwise: bits by quantization
noise power (``4^-bits``), keep ratios linearly in the fraction removed.

``sensitivity="hessian"`` (the default) prices the weight-bit coordinates instead from one
Hessian-trace estimate (:mod:`edgeslim.search.hessian`, HAWQ-V2's ``Tr(H)/n * ||dW||^2``),
at every bit-width, with no measurement; only activation bits and keep ratios are probed.
On resnet20 (21 weight-bit and 13 keep coordinates) that is 15 measurements instead of 35,
which is what lets greedy and dp finish within a budget of 24. ``"probe"`` probes all.

- ``greedy`` starts from the least compressed policy and repeatedly takes the one-step
  compression with the best ratio of constraint excess removed to sensitivity added,
  until every analytic constraint holds.
- ``dp`` solves the multiple-choice knapsack exactly on the most violated constraint
  (costs of each coordinate's choices measured analytically, assumed additive, as size
  and BOPs are across layers): the least total sensitivity that saves enough. Any
  constraint still broken (another one, or non-additive pruning costs) is then repaired
  greedily.

Each then asks its chosen policy and, with the budget left (``refine=True``, the default),
its neighbours: one compressed coordinate given one choice back (most predicted
sensitivity saved first) and the limits restored by the same greedy compression of the
others, never back onto that choice. They are asked in the order of their predicted total
sensitivity, as many as the budget has left, and the search keeps the most accurate
feasible policy measured. Why: the sensitivities are estimates (one probe per coordinate
interpolated, Hessian traces, additivity assumed) and allocations they rank close differ
when measured; until 2026-12-06 greedy and dp finished after ``1 + probes + 1``
measurements and left the rest of the budget unused (resnet20: 16 of 24,
mobilenetv2-imagenet: 23 of 28). Re-deciding the whole allocation without each choice
(a next-best knapsack) was tried first: 42 s (dp) and 185 s (greedy) of analytic checks
for resnet20's 34 alternatives, more than the measurements they fill; a neighbour costs a
repair of one or two steps (3.6 s for resnet20's, 77-126 s for mobilenetv2-imagenet's,
where each new pruned structure's analytic costs take about 0.2 s; at most twice as many
repairs as the budget has measurements left). ``refine=False`` stops at the chosen policy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from edgeslim.search.constraints import Check
from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.space import Dim
from edgeslim.search.strategies.base import (
    Context,
    GeneStrategy,
    hessian_prices,
    register,
    sensitivity,
)

_EPS = 1e-12
SENSITIVITIES = ("hessian", "probe")


def choice_fraction(dim: Dim, index: int) -> float:
    """How much of the probe's (index 0) damage choice ``index`` does: 1 at the most
    compressed choice, 0 at the least (bits by noise power, keep ratios linearly)."""
    last = len(dim.choices) - 1
    if index >= last:
        return 0.0
    if dim.kind == "keep":
        k = dim.choices
        return float((k[last] - k[index]) / (k[last] - k[0]))

    def noise(b: int | None) -> float:
        return 4.0 ** -(32 if b is None else b)

    lo, hi = noise(dim.choices[0]), noise(dim.choices[last])
    return (noise(dim.choices[index]) - hi) / (lo - hi) if lo > hi else 0.0


def excess(checks: Sequence[Check]) -> float:
    return sum(c.excess for c in checks)


class _Probing(GeneStrategy):
    """Sensitivity probes, then one decided policy (see the module doc)."""

    def __init__(self, ctx: Context, sensitivity: str = "hessian", refine: bool = True) -> None:
        super().__init__(ctx)
        if not isinstance(refine, bool):
            raise SearchError(f"{self.name}: refine must be true or false; got {refine!r}")
        self.refine = refine
        if sensitivity not in SENSITIVITIES:
            raise SearchError(
                f"{self.name}: sensitivity must be one of {', '.join(SENSITIVITIES)}; "
                f"got {sensitivity!r}"
            )
        self.top = list(self.space.top())
        self.hessian: dict[int, list[float]] = {}
        if sensitivity == "hessian":
            self.hessian = hessian_prices(self.space, self.notes)
        probed = [d for d in range(len(self.sizes)) if d not in self.hessian]
        probes = [self.top] + [self._with(self.top, d, 0) for d in probed]
        self.queue = [self.mark(g) for g in probes]
        self.probes = {p.id for p in self.queue}
        self.results: dict[str, EvalResult] = {}
        self.stage = "probe"
        self.sens: list[list[float]] = []
        self.chosen: list[int] = []  # the decided allocation
        self.neighbours: set[str] = set()  # its neighbours asked (refine)

    @staticmethod
    def _with(genes: Sequence[int], d: int, value: int) -> list[int]:
        out = list(genes)
        out[d] = value
        return out

    def is_probe(self, policy: Policy) -> bool:
        return self.stage == "probe" and policy.id in self.probes

    def ask(self) -> Policy | None:
        return self.queue.pop(0) if self.queue else None

    def tell(self, policy: Policy, result: EvalResult) -> None:
        self.results[policy.id] = result
        if self.stage == "final":
            self._refine()
            return
        if self.stage == "refine":
            self._finished = not self.queue and self.neighbours <= set(self.results)
            return
        if self.queue or any(pid not in self.results for pid in self.probes):
            return
        self._measure_sensitivity()
        self.chosen = self.decide()
        self.stage = "final"
        self.queue = [self.mark(self.chosen)]
        self.notes["chosen"] = self.policy(self.chosen).id

    def predicted(self, genes: Sequence[int]) -> float:
        """Total sensitivity of ``genes`` as the strategy estimates it (additive)."""
        return sum(self.sens[d][c] for d, c in enumerate(genes))

    def _refine(self) -> None:
        """Queue the chosen allocation's neighbours (see the module doc), or finish."""
        left = None if self.ctx.budget is None else self.ctx.budget - len(self.results)
        if not self.refine or (left is not None and left <= 0):
            self._finished = True
            return
        base = self.chosen
        gains = sorted(
            ((self.sens[d][c] - self.sens[d][c + 1], d) for d, c in enumerate(base)
             if c < self.top[d] and self.sens[d][c] > self.sens[d][c + 1]),
            key=lambda t: -t[0],
        )  # fmt: skip
        found: dict[str, tuple[float, list[int]]] = {}
        tries = gains if left is None else gains[: 2 * left]  # a repair is not free
        for _, d in tries:
            if left is not None and len(found) >= left:
                break
            raised = self._with(base, d, base[d] + 1)
            genes = self.repair(raised, forbid={(d, base[d])}, record=False)
            pid = self.policy(genes).id
            if pid in self.seen or pid in found or not all(c.ok for c in self.checks(genes)):
                continue  # asked already, or the limits cannot be restored without d
            found[pid] = (self.predicted(genes), genes)
        ranked = sorted(found.values(), key=lambda t: t[0])
        self.queue = [self.mark(g) for _, g in ranked]
        self.neighbours = {p.id for p in self.queue}
        self.notes["neighbours"] = len(self.queue)
        self.stage = "refine"
        self._finished = not self.queue

    def _measure_sensitivity(self) -> None:
        ref = self.results[self.policy(self.top).id]
        per_dim = {}
        for d, dim in enumerate(self.space.dims):
            if d in self.hessian:
                self.sens.append(self.hessian[d])
                per_dim[dim.label] = self.hessian[d][0]
                continue
            probe = self.results[self.policy(self._with(self.top, d, 0)).id]
            s_low = max(sensitivity(probe, ref), 0.0)
            per_dim[dim.label] = s_low
            self.sens.append([s_low * choice_fraction(dim, c) for c in range(len(dim.choices))])
        self.notes["sensitivity"] = per_dim

    def decide(self) -> list[int]:
        raise NotImplementedError

    def checks(self, genes: Sequence[int]) -> tuple[Check, ...]:
        return self.ctx.checks(self.policy(genes))

    def repair(
        self, genes: list[int], forbid: Collection[tuple[int, int]] = (), record: bool = True
    ) -> list[int]:
        """Greedy one-step compressions until every analytic constraint holds (or none of
        the remaining steps reduces the excess), never onto a ``forbid`` choice; with
        ``record``, ``notes`` get the steps taken and any limit left unmet (a neighbour's
        repair records nothing: its failure says nothing of the decided policy)."""
        checks = self.checks(genes)
        steps = 0
        while not all(c.ok for c in checks):
            current = excess(checks)
            best: tuple[float, float, list[int], tuple[Check, ...]] | None = None
            for d in range(len(genes)):
                if genes[d] == 0 or (d, genes[d] - 1) in forbid:
                    continue
                trial = self._with(genes, d, genes[d] - 1)
                tc = self.checks(trial)
                gain = current - excess(tc)
                if gain <= _EPS:
                    continue
                added = self.sens[d][trial[d]] - self.sens[d][genes[d]]
                key = (gain / (max(added, 0.0) + 1e-9), gain)
                if best is None or key > (best[0], best[1]):
                    best = (key[0], key[1], trial, tc)
            if best is None:
                if record:
                    self.notes["unmet"] = [c.constraint for c in checks if not c.ok]
                break
            genes, checks = best[2], best[3]
            steps += 1
        if record:
            self.notes["greedy_steps"] = self.notes.get("greedy_steps", 0) + steps
        return genes


@register("greedy")
class GreedyAllocation(_Probing):
    """Sensitivity probes, then greedy compression until the constraints hold."""

    name = "greedy"

    def __init__(self, ctx: Context, sensitivity: str = "hessian", refine: bool = True) -> None:
        super().__init__(ctx, sensitivity, refine)

    def decide(self) -> list[int]:
        return self.repair(list(self.top))


@register("dp")
class DPAllocation(_Probing):
    """Sensitivity probes, then an exact knapsack on the most violated constraint."""

    name = "dp"

    def __init__(
        self, ctx: Context, resolution: int = 1000, sensitivity: str = "hessian",
        refine: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(ctx, sensitivity, refine)
        self.resolution = resolution

    def decide(self) -> list[int]:
        top_checks = self.checks(self.top)
        if all(c.ok for c in top_checks):
            return list(self.top)
        at = max(range(len(top_checks)), key=lambda i: top_checks[i].excess)
        primary = top_checks[at]
        # in base units: a relative limit is achieved/value of the baseline, so this holds
        # for both kinds (an absolute check has achieved == value)
        limit = primary.limit * primary.value / primary.achieved
        need = primary.value - limit
        grid = self.resolution
        unit = need / grid
        saves: list[list[int]] = []
        for d, n in enumerate(self.sizes):
            row = []
            for c in range(n):
                value = self.checks(self._with(self.top, d, c))[at].value
                row.append(min(max(math.floor((primary.value - value) / unit + _EPS), 0), grid))
            saves.append(row)
        genes = self._knapsack(saves, grid)
        self.notes["dp_constraint"] = primary.constraint
        return self.repair(genes if genes is not None else [0] * len(self.sizes))

    def _knapsack(self, saves: list[list[int]], grid: int) -> list[int] | None:
        """Least total sensitivity with savings >= ``grid`` units (savings capped there)."""
        inf = math.inf
        best = [inf] * (grid + 1)
        best[0] = 0.0
        back: list[list[tuple[int, int]]] = []
        for d, row in enumerate(saves):
            new = [inf] * (grid + 1)
            arg = [(-1, -1)] * (grid + 1)
            for g in range(grid + 1):
                if best[g] == inf:
                    continue
                for c in range(len(row) - 1, -1, -1):  # least compressed first wins ties
                    g2 = min(grid, g + row[c])
                    v = best[g] + self.sens[d][c]
                    if v < new[g2] - _EPS:
                        new[g2], arg[g2] = v, (c, g)
            best = new
            back.append(arg)
        if best[grid] == inf:
            return None
        genes = [0] * len(saves)
        g = grid
        for d in range(len(saves) - 1, -1, -1):
            c, g = back[d][g]
            genes[d] = c
        return genes
