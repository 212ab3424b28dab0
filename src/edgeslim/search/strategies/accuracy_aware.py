"""``accuracy_aware``: start most compressed, give precision back until ``max_drop`` holds.

The procedure of NNCF's accuracy control and Intel Neural Compressor's tuning loop, with
two additions that give back fewer layers for the same measurements:

1. measure the most compressed policy of the space (or ``start``; when the most
   compressed breaks an analytic limit, the most compressed uniform policy that does not);
   if its drop is within ``max_drop`` it is the answer, with nothing given back;
2. rank the units (a layer: its weight and activation bits; a group: its keep ratio) by
   sensitivity, measured once per unit (see ``rank``);
3. give the most sensitive units back until the drop is within ``max_drop``. A unit goes
   back to its least compressed choice, or, when that would break an analytic constraint
   (checked without measuring), to the highest choice that keeps them; a unit that cannot
   move at all is skipped. When such a limit binds, ``give="step"`` (what ``auto`` picks
   then) gives back one choice per unit per pass over the order instead, so the limit's
   room is shared by the sensitive units rather than spent on the first ones (see
   :meth:`AccuracyAware._plan`). ``steps="linear"`` measures after each unit (NNCF);
   ``steps="gallop"`` (default) measures the first 1, 2, 4, 8, ... units back, then bisects
   between the last two, finding the same number of units (when accuracy only grows with
   what is given back) in about ``2 log2(k)`` measurements instead of ``k``;
4. ``trim=True`` (default): a unit given back early, on its sensitivity alone, may not be
   needed once the others are back; each one, least sensitive first, is compressed again
   and kept compressed when the drop stays within ``max_drop``.

The answer is the last policy within ``max_drop`` (the one with the fewest units given
back), not the most accurate one measured on the way: that is what this mode is for.

``rank="alone"`` measures each unit compressed alone, everything else least compressed
(GBA's probes: a clean signal even when the start has collapsed, e.g. 2-bit);
``rank="restore"`` measures the start with only that unit restored (NNCF's ranking, which
sees the interactions between compressed layers but is noise when the start is at chance);
``rank="hessian"`` prices a unit whose only compressed coordinates are weight bits or a
keep ratio from one Hessian-trace estimate (HAWQ-V2 for bits, the refit-aware pruning
price of :func:`~edgeslim.search.hessian.keep_sensitivity` for a group; no measurement)
and probes the others alone. ``rank="auto"`` (default) prices weight bits that way when
it can (they cost no measurement, which a small budget needs; resnet20 with pruning has
34 units for a budget of 24), and keep ratios too when probing them would leave fewer
than ``log2(units + 1) + 1`` measurements of the budget for giving back
(mobilenetv2-imagenet: 21 searched groups and 53 layers for a budget of 28; until
2026-12-06 the probes took 27 of the 28 and nothing feasible was found); with nothing
priced it takes ``restore`` when the start keeps at least half of the uncompressed
metric, else ``alone``. Sensitivity is the validation loss change (the metric's when no
loss is measured). ``notes`` list the units given back and trimmed, and ``keep_priced``
why keep ratios were priced rather than probed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import (
    Context,
    GeneStrategy,
    hessian_prices,
    register,
    sensitivity,
)

RANKS = ("auto", "alone", "restore", "hessian")
STEPS = ("gallop", "linear")
GIVES = ("auto", "full", "step")


@register("accuracy_aware")
class AccuracyAware(GeneStrategy):
    """Give precision back, most sensitive unit first, then trim (see the module doc)."""

    name = "accuracy_aware"

    def __init__(
        self,
        ctx: Context,
        start: Policy | Mapping[str, object] | None = None,
        rank: str = "auto",
        steps: str = "gallop",
        trim: bool = True,
        give: str = "auto",
    ) -> None:
        super().__init__(ctx)
        if ctx.constraints.max_drop is None:
            raise SearchError(
                "accuracy_aware needs an accuracy limit: pass max_drop=<points> (or the "
                "constraint drop<=<points>)"
            )
        if rank not in RANKS:
            raise SearchError(f"accuracy_aware: rank must be one of {RANKS}; got {rank!r}")
        if steps not in STEPS:
            raise SearchError(f"accuracy_aware: steps must be one of {STEPS}; got {steps!r}")
        if give not in GIVES:
            raise SearchError(f"accuracy_aware: give must be one of {GIVES}; got {give!r}")
        if start is None:
            genes = self._compressed_start()
        else:
            policy = start if isinstance(start, Policy) else Policy.from_dict(start)
            genes = list(self.space.encode(policy))
        self.rank, self.steps, self.trim, self.give = rank, steps, trim, give
        self.start = genes
        self.top = list(self.space.top())
        units: dict[str, list[int]] = {}
        for d, dim in enumerate(self.space.dims):
            if genes[d] != self.top[d]:
                units.setdefault(dim.unit, []).append(d)
        self.units = units
        self.current = list(genes)
        self.answer: Policy | None = None
        self.order: list[str] = []
        self.given_back: list[str] = []
        self.skipped: list[str] = []
        self.trimmed: list[str] = []
        self.results: dict[str, EvalResult] = {}
        self.stage = "start"
        self.probes: set[str] = set()
        self.priced: dict[str, float] = {}  # units ranked by the Hessian estimate
        self.queue: list[Policy] = [self.mark(genes)]
        # give-back state: prefixes[k] = the start with the first k movable units back
        self.prefixes: list[list[int]] = []
        self.moved: list[str] = []  # the unit moved by each prefix (step: once per choice)
        self.lo = 0  # largest k measured outside max_drop
        self.hi: int | None = None  # smallest k measured within it
        self.k = 0  # the k being measured
        self.to_trim: list[str] = []
        self.notes.update(given_back=[], given_back_count=0, units=len(units), trimmed=[])

    def _compressed_start(self) -> list[int]:
        """Every coordinate at its most compressed choice; when that breaks an analytic
        limit (latency: a pruned small model can be slower than the unpruned one), the
        most compressed uniform policy of the space within every analytic limit."""
        genes = [0] * len(self.sizes)
        if all(c.ok for c in self.ctx.checks(self.policy(genes))):
            return genes
        for policy in self.space.uniforms():
            if all(c.ok for c in self.ctx.checks(policy)):
                self.notes["start_moved"] = (
                    "the most compressed policy breaks an analytic limit; started from "
                    f"{policy.describe()}, the most compressed uniform policy within them"
                )
                return list(self.space.encode(policy))
        return genes

    def _set(self, genes: Sequence[int], unit: str, source: Sequence[int]) -> list[int]:
        """``genes`` with ``unit``'s coordinates taken from ``source``."""
        out = list(genes)
        for d in self.units[unit]:
            out[d] = source[d]
        return out

    def _probe(self, unit: str) -> list[int]:
        if self.rank == "restore":
            return self._set(self.start, unit, self.top)
        return self._set(self.top, unit, self.start)

    def _short_of_budget(self) -> bool:
        """Whether probing the units not priced yet would leave fewer than ``log2(units +
        1) + 1`` measurements of the budget for giving back: what a gallop takes to reach
        the whole plan (1, 2, 4, ... units back), so a feasible prefix is found when there
        is one; bisecting towards fewer units back needs more, but is not what makes the
        answer feasible. The reason goes to ``notes["keep_priced"]``."""
        budget = self.ctx.budget
        probes = sum(u not in self.priced for u in self.units)
        if budget is None or not probes:
            return False
        need = 2 + probes + math.ceil(math.log2(len(self.units) + 1)) + 1  # start, top
        if need <= budget:
            return False
        self.notes["keep_priced"] = (
            f"{probes} probes and {need - 2 - probes} give-back steps need {need} "
            f"measurements, over the budget of {budget}: keep ratios priced from the "
            "Hessian estimate instead of probed"
        )
        return True

    def _hessian_prices(self, keep: bool) -> dict[str, float]:
        """Predicted loss increase of each unit at its start choices, for units whose
        compressed coordinates are all priced (weight bits; with ``keep``, keep ratios)."""
        per_dim = hessian_prices(self.space, self.notes, keep=keep)
        return {
            unit: sum(per_dim[d][self.start[d]] for d in dims)
            for unit, dims in self.units.items()
            if all(d in per_dim for d in dims)
        }

    def is_probe(self, policy: Policy) -> bool:
        return self.stage == "probe" and policy.id in self.probes

    def ask(self) -> Policy | None:
        return self.queue.pop(0) if self.queue else None

    def tell(self, policy: Policy, result: EvalResult) -> None:
        self.results[policy.id] = result
        if self.stage == "start":
            self._told_start(result)
        elif self.stage == "probe":
            if self.queue or any(pid not in self.results for pid in self.probes):
                return
            self._probes_done()
        elif self.stage == "give_back":
            self._step(result.feasible)
        else:
            self._told_trim(result.feasible)

    def _told_start(self, result: EvalResult) -> None:
        self.notes["start_drop"] = result.drop
        if not result.evaluated:  # giving back only adds cost: nothing can be feasible
            self.notes["unmet"] = [c.constraint for c in result.checks if not c.ok]
            self._done(False)
            return
        if result.feasible or not self.units:
            if result.feasible:
                self.answer = self.policy(self.start)
            self._done(result.feasible)
            return
        if self.rank in ("auto", "hessian"):
            self.priced = self._hessian_prices(keep=self.rank == "hessian")
            if self.rank == "auto" and self._short_of_budget():
                self.priced = self._hessian_prices(keep=True)
            if self.rank == "auto" and not self.priced:
                kept = result.metric is not None and result.metric >= 0.5 * result.baseline
                self.rank = "restore" if kept else "alone"
            else:
                self.rank = "hessian"
        self.notes["rank"] = self.rank
        probes = [self.mark(self._probe(u)) for u in self.units if u not in self.priced]
        if probes and self.rank != "restore":
            probes.append(self.mark(self.top))
        self.probes.update(p.id for p in probes)
        self.queue = probes
        self.stage = "probe"
        if not probes:  # every unit priced without measuring
            self._probes_done()

    def _probes_done(self) -> None:
        self._rank()
        self._plan()
        self.stage = "give_back"
        self._step(None)

    def _rank(self) -> None:
        gain: dict[str, float] = {}
        for u in self.units:
            if u in self.priced:  # predicted damage alone
                gain[u] = self.priced[u]
                continue
            probe = self.results[self.policy(self._probe(u)).id]
            if self.rank != "restore":  # damage the unit does alone
                gain[u] = sensitivity(probe, self.results[self.policy(self.top).id])
            else:  # what restoring it recovers
                gain[u] = sensitivity(self.results[self.policy(self.start).id], probe)
        self.order = sorted(self.units, key=lambda u: -gain[u])
        self.notes["sensitivity"] = gain

    def _raise(self, genes: Sequence[int], unit: str, steps: int | None) -> list[int] | None:
        """``genes`` with ``unit`` up to ``steps`` choices back (None: to its top), the most
        that stays within the analytic limits; None when it cannot move at all."""
        dims = self.units[unit]
        most = max(self.top[d] - genes[d] for d in dims)
        for s in range(most if steps is None else min(steps, most), 0, -1):
            trial = list(genes)
            for d in dims:
                trial[d] = min(genes[d] + s, self.top[d])
            if all(c.ok for c in self.ctx.checks(self.policy(trial))):
                return trial
        return None

    def _plan(self) -> None:
        """Every prefix of the give-back sequence. ``give="full"``: each unit in order, as
        far back as the analytic limits allow. ``give="step"``: passes over the order, each
        unit one choice back per pass, so a limit (size, latency) is shared among the
        sensitive units instead of spent on the first ones. ``auto``: full, unless the
        full plan meets a limit (a unit it cannot move)."""
        moves: list[tuple[str, list[int]]] = []
        if self.give != "step":
            moves = self._full_moves()
        full = self.give == "full" or (
            self.give == "auto" and len({u for u, _ in moves}) == len(self.order)
        )
        if not full:
            moves = self._step_moves()
        self.notes["give"] = "full" if full else "step"
        self.moved = [u for u, _ in moves]
        self.prefixes = [list(self.start), *(g for _, g in moves)]
        back = set(self.moved)
        self.skipped = [u for u in self.order if u not in back]

    def _full_moves(self) -> list[tuple[str, list[int]]]:
        current, moves = list(self.start), []
        for unit in self.order:
            trial = self._raise(current, unit, None)
            if trial is not None:
                current = trial
                moves.append((unit, current))
        return moves

    def _step_moves(self) -> list[tuple[str, list[int]]]:
        """Passes over the order until one moves nothing. A unit a limit blocks is tried
        again on the next pass: latency is not monotonic in what is given back (on resnet20
        restoring one residual stream's channels while the other groups stay pruned broke
        latency <= 0.6x, 0.606x, and fitted once they were back)."""
        current, moves = list(self.start), []
        moved = True
        while moved:
            moved = False
            for unit in self.order:
                trial = self._raise(current, unit, 1)
                if trial is not None:
                    current, moved = trial, True
                    moves.append((unit, current))
        return moves

    def _step(self, feasible: bool | None) -> None:
        """Record the last give-back measurement (``k`` units back) and ask the next."""
        n = len(self.prefixes) - 1
        if feasible is not None:
            if feasible:
                self.hi = self.k
            else:
                self.lo = self.k
        if self.hi is not None and self.hi - self.lo <= 1:
            self._found(self.hi)
            return
        if self.hi is None and self.lo >= n:
            self._done(False)
            return
        if self.hi is None:
            k = self.lo + 1 if self.steps == "linear" or self.lo == 0 else min(2 * self.lo, n)
        else:
            k = (self.lo + self.hi) // 2
        self.k = k
        self.queue = [self.mark(self.prefixes[k])]
        self._note_back(list(dict.fromkeys(self.moved[:k])))

    def _found(self, k: int) -> None:
        self.current = list(self.prefixes[k])
        self.given_back = list(dict.fromkeys(self.moved[:k]))
        self.answer = self.policy(self.current)
        self.notes["max_drop_met"] = True
        self._note_back(self.given_back)
        self.to_trim = list(reversed(self.given_back)) if self.trim else []
        self.stage = "trim"
        self._next_trim()

    def _next_trim(self) -> None:
        if not self.to_trim:
            self._done(True)
            return
        unit = self.to_trim[0]
        trial = self._set(self.current, unit, self.start)
        self.queue = [self.mark(trial)]

    def _told_trim(self, feasible: bool) -> None:
        unit = self.to_trim.pop(0)
        if feasible:
            self.current = self._set(self.current, unit, self.start)
            self.answer = self.policy(self.current)
            self.given_back.remove(unit)
            self.trimmed.append(unit)
            self._note_back(self.given_back)
        self._next_trim()

    def _note_back(self, units: Sequence[str]) -> None:
        self.notes.update(
            given_back=list(units), given_back_count=len(units), trimmed=list(self.trimmed)
        )

    def _done(self, met: bool) -> None:
        self._finished = True
        self.notes.update(max_drop_met=met, skipped=list(self.skipped))
        self._note_back(self.given_back)
