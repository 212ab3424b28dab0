"""``accuracy_aware``: start most compressed, give precision back until ``max_drop`` holds.

The procedure of NNCF's accuracy control and Intel Neural Compressor's tuning loop:

1. measure the most compressed policy of the space (or ``start``); if its drop is within
   ``max_drop`` it is the answer, with nothing given back;
2. rank the units (a layer: its weight and activation bits; a group: its keep ratio) by
   sensitivity, measured once per unit (see ``rank``);
3. give units back one at a time, most sensitive first, measuring after each, until the
   drop is within ``max_drop``. A unit goes back to its least compressed choice, or, when
   that would break an analytic constraint (checked without measuring), to the highest
   choice that keeps them; a unit that cannot move at all is skipped.

``rank="alone"`` (default) measures each unit compressed alone, everything else least
compressed (GBA's probes: a clean signal even when the start has collapsed, e.g. 2-bit);
``rank="restore"`` measures the start with only that unit restored (NNCF's ranking, which
sees interactions but is noisy when the start is far gone). Sensitivity is the validation
loss change (the metric's when no loss is measured). ``notes`` list the units given back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register, sensitivity


@register("accuracy_aware")
class AccuracyAware(GeneStrategy):
    """Give precision back, most sensitive unit first (see the module doc)."""

    name = "accuracy_aware"

    def __init__(
        self,
        ctx: Context,
        start: Policy | Mapping[str, object] | None = None,
        rank: str = "alone",
    ) -> None:
        super().__init__(ctx)
        if ctx.constraints.max_drop is None:
            raise SearchError(
                "accuracy_aware needs an accuracy limit: pass max_drop=<points> (or the "
                "constraint drop<=<points>)"
            )
        if rank not in ("alone", "restore"):
            raise SearchError(f"accuracy_aware: rank must be 'alone' or 'restore'; got {rank!r}")
        if start is None:
            genes = [0] * len(self.sizes)
        else:
            policy = start if isinstance(start, Policy) else Policy.from_dict(start)
            genes = list(self.space.encode(policy))
        self.rank = rank
        self.start = genes
        self.top = list(self.space.top())
        units: dict[str, list[int]] = {}
        for d, dim in enumerate(self.space.dims):
            if genes[d] != self.top[d]:
                units.setdefault(dim.unit, []).append(d)
        self.units = units
        self.current = list(genes)
        self.order: list[str] = []
        self.given_back: list[str] = []
        self.skipped: list[str] = []
        self.results: dict[str, EvalResult] = {}
        self.stage = "start"
        self.probes: set[str] = set()
        self.queue: list[Policy] = [self.mark(genes)]
        self.notes.update(given_back=[], given_back_count=0, units=len(units))

    def _set(self, genes: Sequence[int], unit: str, source: Sequence[int]) -> list[int]:
        """``genes`` with ``unit``'s coordinates taken from ``source``."""
        out = list(genes)
        for d in self.units[unit]:
            out[d] = source[d]
        return out

    def _probe(self, unit: str) -> list[int]:
        if self.rank == "alone":
            return self._set(self.top, unit, self.start)
        return self._set(self.start, unit, self.top)

    def is_probe(self, policy: Policy) -> bool:
        return self.stage == "probe" and policy.id in self.probes

    def ask(self) -> Policy | None:
        return self.queue.pop(0) if self.queue else None

    def tell(self, policy: Policy, result: EvalResult) -> None:
        self.results[policy.id] = result
        if self.stage == "start":
            self.notes["start_drop"] = result.drop
            if not result.evaluated:  # giving back only adds cost: nothing can be feasible
                self.notes["unmet"] = [c.constraint for c in result.checks if not c.ok]
                self._done(False)
                return
            if result.feasible or not self.units:
                self._done(result.feasible)
                return
            probes = [self.mark(self._probe(u)) for u in self.units]
            if self.rank == "alone":
                probes.append(self.mark(self.top))
            self.probes.update(p.id for p in probes)
            self.queue = probes
            self.stage = "probe"
            return
        if self.stage == "probe":
            if self.queue or any(pid not in self.results for pid in self.probes):
                return
            self._rank()
            self.stage = "give_back"
            self._next()
            return
        if result.feasible:
            self._done(True)
        else:
            self._next()

    def _rank(self) -> None:
        gain: dict[str, float] = {}
        for u in self.units:
            probe = self.results[self.policy(self._probe(u)).id]
            if self.rank == "alone":  # damage the unit does alone
                gain[u] = sensitivity(probe, self.results[self.policy(self.top).id])
            else:  # what restoring it recovers
                gain[u] = sensitivity(self.results[self.policy(self.start).id], probe)
        self.order = sorted(self.units, key=lambda u: -gain[u])
        self.notes["sensitivity"] = gain

    def _next(self) -> None:
        """Give back the next most sensitive unit, as far as the analytic limits allow."""
        while self.order:
            unit = self.order.pop(0)
            dims = self.units[unit]
            steps = max(self.top[d] - self.current[d] for d in dims)
            for s in range(steps, 0, -1):
                trial = list(self.current)
                for d in dims:
                    trial[d] = min(self.current[d] + s, self.top[d])
                if all(c.ok for c in self.ctx.checks(self.policy(trial))):
                    break
            else:
                self.skipped.append(unit)
                continue
            self.current = trial
            self.given_back.append(unit)
            self.queue = [self.mark(trial)]
            self.notes.update(
                given_back=list(self.given_back), given_back_count=len(self.given_back)
            )
            return
        self._done(False)

    def _done(self, met: bool) -> None:
        self._finished = True
        self.notes.update(
            max_drop_met=met, skipped=list(self.skipped),
            given_back=list(self.given_back), given_back_count=len(self.given_back),
        )  # fmt: skip
