"""``search``: the loop that joins a space, constraints, a strategy, an executor and a journal.

Each round the strategy is asked for up to ``batch`` policies that need measuring. Every
asked policy is first resolved cheaply when it can be: replayed from the journal, taken
from the evaluator's cache (asked before), or rejected unmeasured because it breaks an
analytic constraint; the rest go to the executor together. Results are journaled and told
to the strategy in ask order. ``budget`` counts measurements only (replayed measurements
included), so cheap rejections steer the strategy for free.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.report.pareto import pareto_front
from edgeslim.search.constraints import Constraints, LatencyPredictor
from edgeslim.search.errors import JournalError, SearchError
from edgeslim.search.evaluate import EvalResult, Evaluator
from edgeslim.search.executor import Executor, LocalExecutor
from edgeslim.search.journal import Journal, JournalRecord
from edgeslim.search.policy import Policy
from edgeslim.search.space import Costs, SearchSpace
from edgeslim.search.strategies.base import Context, Strategy, make_strategy
from edgeslim.task import Task


@dataclass(frozen=True)
class Evaluation:
    """One told result: ``source`` is measured, cached or rejected (unmeasured);
    ``replayed`` when it came from the journal of an earlier run; ``probe`` when the
    strategy measured it for information (sensitivity), not as a candidate answer."""

    index: int
    policy: Policy
    result: EvalResult
    source: str
    replayed: bool = False
    probe: bool = False

    @property
    def counted(self) -> bool:
        return self.source == "measured"


@dataclass
class SearchResult:
    """What a search found. ``best`` is the best **feasible** measured policy (the
    strategy's own ``answer`` when it names one, see :mod:`.strategies.base`), or None when
    no measured policy met every constraint (then ``closest`` is the least violating one,
    clearly not a solution, and ``message`` says so)."""

    strategy: str
    seed: int
    budget: int
    metric: str
    baseline_metric: float
    baseline_costs: Costs
    constraints: Constraints
    evaluations: list[Evaluation]
    best: Evaluation | None
    closest: Evaluation | None
    first_feasible: int | None
    pareto: dict[str, list[Evaluation]]
    notes: dict[str, Any] = field(default_factory=dict)
    evaluator_notes: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def feasible(self) -> bool:
        return self.best is not None

    @property
    def policy(self) -> Policy | None:
        """The best feasible policy (None when none was found)."""
        return None if self.best is None else self.best.policy

    @property
    def measured(self) -> int:
        """Measurements spent (the budget's unit), replayed ones included."""
        return sum(e.counted for e in self.evaluations)

    @property
    def rejected(self) -> int:
        return sum(e.source == "rejected" for e in self.evaluations)

    def summary(self) -> str:
        lines = [
            f"search {self.strategy} (seed {self.seed}): {self.measured} measured of budget "
            f"{self.budget}, {self.rejected} rejected unmeasured; constraints: {self.constraints}",
            f"uncompressed {self.metric}: {self.baseline_metric:.4g}",
            self.message,
        ]
        if self.first_feasible is not None:
            lines.append(f"first feasible policy after {self.first_feasible} measurement(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def ev(e: Evaluation | None) -> dict[str, Any] | None:
            if e is None:
                return None
            return {"index": e.index, "policy": e.policy.to_dict(), "result": e.result.to_dict()}

        def row(e: Evaluation) -> dict[str, Any]:
            return {
                **(ev(e) or {}), "policy_id": e.policy.id, "source": e.source,
                "replayed": e.replayed, "probe": e.probe,
            }  # fmt: skip

        return {
            "strategy": self.strategy, "seed": self.seed, "budget": self.budget,
            "metric": self.metric, "baseline_metric": self.baseline_metric,
            "baseline_costs": self.baseline_costs.to_dict(),
            "constraints": self.constraints.to_list(), "feasible": self.feasible,
            "best": ev(self.best), "closest": ev(self.closest), "measured": self.measured,
            "rejected": self.rejected, "first_feasible": self.first_feasible,
            "pareto": {k: [e.policy.id for e in v] for k, v in self.pareto.items()},
            "notes": self.notes, "evaluator_notes": self.evaluator_notes, "message": self.message,
            "evaluations": [row(e) for e in self.evaluations],
        }  # fmt: skip


def _jsonable(value: Any) -> Any:
    """Strategy options as JSON for the journal header (policies by their content)."""
    if isinstance(value, Policy):
        return value.to_dict()
    text = json.dumps(value, default=lambda v: v.to_dict() if isinstance(v, Policy) else repr(v))
    return json.loads(text)


def _pareto(evals: list[Evaluation], costs: Iterable[str]) -> dict[str, list[Evaluation]]:
    """Non-dominated measured policies, metric up vs each cost (relative to fp32) down."""
    measured = list({e.policy.id: e for e in evals if e.result.metric is not None}.values())
    out: dict[str, list[Evaluation]] = {}
    for cost in costs:
        have = [e for e in measured if cost in e.result.relative]
        points = [(e.result.relative[cost], float(e.result.metric or 0.0)) for e in have]
        out[cost] = [have[i] for i in pareto_front(points)]
    return out


def _message(
    best: Evaluation | None,
    closest: Evaluation | None,
    metric: str,
    n: int,
    probes: int = 0,
    strategy: str = "",
    planned: int = 0,
) -> str:
    if best is None and probes and probes == n:  # the budget ended before any candidate
        need = (f"to at least {planned + 1} ({strategy} plans {planned} probes on this space, "
                "then asks its policy)" if planned > probes else
                "(the strategy asks its probes, then its policy)")  # fmt: skip
        return (
            f"NO FEASIBLE POLICY: the budget went on {strategy}'s {probes} sensitivity "
            f"probe(s); no candidate policy was asked. Raise the budget {need}"
        )
    if best is not None:
        r = best.result
        return (
            f"best feasible policy {best.policy.id} ({best.policy.describe()}): {metric} "
            f"{r.metric:.4g} (drop {r.drop:.3g}); " + "; ".join(str(c) for c in r.checks)
        )
    if closest is None:
        return f"NO FEASIBLE POLICY: none of the {n} asked policies was measured"
    broken = "; ".join(str(c) for c in closest.result.checks if not c.ok)
    return (
        f"NO FEASIBLE POLICY among {n} asked: no measured policy met every constraint. "
        f"Closest (not a solution): {closest.policy.id} ({closest.policy.describe()}), {broken}"
    )


def _check_counts(budget: int, batch: int) -> None:
    for name, value in (("budget", budget), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SearchError(f"{name} must be a positive number of measurements; got {value!r}")


def search(
    model: nn.Module,
    task: Task,
    space: SearchSpace | None = None,
    constraints: Constraints | str | Iterable[str] | None = None,
    strategy: str | Strategy = "evolutionary",
    budget: int = 50,
    seed: int = 0,
    journal: Path | str | None = None,
    executor: Executor | None = None,
    *,
    batch: int = 4,
    max_drop: float | None = None,
    latency: LatencyPredictor | None = None,
    evaluator: Evaluator | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search ``space`` (default: :meth:`SearchSpace.build` of ``model`` on ``task``) for
    the policy with the best validation metric that meets ``constraints`` (strings like
    ``"size<=0.25x"``, plus ``max_drop`` points of the metric), spending at most
    ``budget`` measurements.

    ``strategy``: a registered name (``random``, ``evolutionary``, ``abc``, ``reinforce``,
    ``envelope_ddpg``, ``greedy``, ``dp``, ``accuracy_aware``) built with ``options`` and
    ``seed``, or a strategy object. ``journal``: a JSONL path; rerunning with it resumes (see
    :mod:`edgeslim.search.journal`). ``batch`` policies are asked before results are told,
    which a parallel ``executor`` measures at once; the same seed and batch give the same
    search on any executor. ``latency`` predicts latency for ``latency<=`` constraints.
    The model is never changed.
    """
    _check_counts(budget, batch)
    space = space if space is not None else SearchSpace.build(model, task, seed=seed)
    if model is not space.model and model is not space.source:
        raise SearchError("the search space was built for another model object")
    if evaluator is None:
        evaluator = Evaluator(space, Constraints.parse(constraints, max_drop), latency=latency)
    elif constraints is not None or max_drop is not None or latency is not None:
        raise SearchError("with an evaluator, give constraints, max_drop and latency to it")
    elif evaluator.space is not space:
        raise SearchError("the evaluator was built for another search space")
    cons = evaluator.constraints
    ctx = Context(space, cons, seed, evaluator.checks, budget)
    if isinstance(strategy, str):
        strat = make_strategy(strategy, ctx, **dict(options or {}))
    elif options:
        raise SearchError("options apply to a strategy given by name, not to a strategy object")
    else:
        strat = strategy
    executor = executor if executor is not None else LocalExecutor()
    header = {
        "model": space.model_fingerprint, "space": space.fingerprint, "strategy": strat.name,
        "options": _jsonable(dict(options or {})), "seed": seed, "batch": batch,
        "constraints": cons.to_list(), "evaluator": evaluator.describe(),
    }  # fmt: skip
    jr = Journal.open(journal, header) if journal is not None else None
    try:
        evals = _loop(strat, evaluator, executor, jr, budget, batch, progress)
    finally:
        if jr is not None:
            jr.close()
    return _result(strat, evaluator, seed, budget, evals)


@dataclass
class _Asked:
    policy: Policy
    result: EvalResult | None  # None: to be measured by the executor
    source: str
    replayed: bool
    probe: bool


class _Loop:
    """The ask -> resolve -> measure -> journal -> tell cycle of :func:`search`.

    A policy resolved without measuring (replayed, cached, rejected) is told at once when
    no measurement is pending before it in the batch, so a strategy learns from cheap
    rejections before its next ask; otherwise it waits for the batch, told in ask order.
    The same rule on a resumed run (recorded sources) gives the same ask/tell sequence.
    """

    def __init__(
        self, strat: Strategy, evaluator: Evaluator, executor: Executor, jr: Journal | None,
        budget: int, batch: int,
    ) -> None:  # fmt: skip
        self.strat, self.evaluator, self.executor, self.jr = strat, evaluator, executor, jr
        self.budget, self.batch = budget, batch
        self.replay: list[JournalRecord] = list(jr.records) if jr is not None else []
        self.evals: list[Evaluation] = []
        self.spent = self.asks = 0
        self.max_asks = 20 * budget + 100
        self.best: float | None = None
        self.on_measured: Callable[[], None] = lambda: None

    def run(self) -> list[Evaluation]:
        while self.spent < self.budget and self.asks < self.max_asks:
            if not self._round():
                if self.strat.finished:
                    break
                raise SearchError(
                    f"strategy {self.strat.name!r} proposed nothing while no result was pending"
                )
        if self.asks >= self.max_asks and self.spent < self.budget:
            self.strat.notes["stopped"] = (
                f"stopped after {self.asks} asks with {self.spent} of {self.budget} "
                "measurements spent: the strategy kept proposing policies already measured "
                "or rejected"
            )
        return self.evals

    def _round(self) -> bool:
        """Ask until ``batch`` measurements are pending; measure and tell. False when the
        strategy proposed nothing."""
        batch: list[_Asked] = []
        pending: set[str] = set()
        asked_any = False
        while (
            len(pending) < self.batch
            and self.spent + len(pending) < self.budget
            and self.asks < self.max_asks
        ):
            policy = self.strat.ask()
            if policy is None:
                break
            asked_any = True
            self.asks += 1
            entry = self._resolve(policy, len(self.evals) + len(batch), pending)
            if entry.source == "measured":
                pending.add(entry.policy.id if not entry.replayed else f"#{len(batch)}")
            batch.append(entry)
            if not pending:  # resolved and nothing measured ahead of it: tell at once
                assert entry.result is not None
                self._record(entry)
                self.strat.tell(entry.policy, entry.result)
                batch = []
        todo = [e.policy for e in batch if e.result is None and e.source == "measured"]
        results = iter(self.executor.run(self.evaluator.measure, todo))
        done: dict[str, EvalResult] = {}
        for e in batch:  # journaled as each result arrives, so a kill loses only the rest
            if e.result is None and e.source == "measured":
                e.result = next(results)
                self.evaluator.remember(e.result)
                done[e.policy.id] = e.result
            elif e.result is None:  # asked twice in this batch: the first one's result
                e.result = done[e.policy.id]
            self._record(e)
        for e in batch:
            assert e.result is not None
            self.strat.tell(e.policy, e.result)
        return asked_any

    def _resolve(self, policy: Policy, n: int, pending: set[str]) -> _Asked:
        probe = self.strat.is_probe(policy)
        if n < len(self.replay):
            rec = self.replay[n]
            if rec.policy.id != policy.id:
                where = self.jr.path if self.jr is not None else "the journal"
                raise JournalError(
                    f"{where}: evaluation #{n} was policy {rec.policy.id} but the strategy now "
                    f"asks {policy.id}; the journal comes from a run with other code or data. "
                    "Start a new journal."
                )
            self.evaluator.remember(rec.result)
            return _Asked(policy, rec.result, rec.source, True, probe)
        hit = self.evaluator.cached(policy)
        if hit is not None or policy.id in pending:
            return _Asked(policy, hit, "cached", False, probe)
        rejected = None if probe else self.evaluator.screen(policy)
        if rejected is not None:
            return _Asked(policy, rejected, "rejected", False, probe)
        return _Asked(policy, None, "measured", False, probe)

    def _record(self, e: _Asked) -> None:
        """Journal (durably) and keep one resolved entry; count a measurement."""
        assert e.result is not None
        index = len(self.evals)
        if self.jr is not None and not e.replayed:
            self.jr.append(index, e.policy, e.source, e.result)
        self.evals.append(Evaluation(index, e.policy, e.result, e.source, e.replayed, e.probe))
        if e.source == "measured":
            self.spent += 1
            r = e.result
            if r.feasible and r.metric is not None and not e.probe:
                self.best = r.metric if self.best is None else max(self.best, r.metric)
            self.on_measured()


def _loop(
    strat: Strategy,
    evaluator: Evaluator,
    executor: Executor,
    jr: Journal | None,
    budget: int,
    batch: int,
    progress: bool,
) -> list[Evaluation]:
    from edgeslim.progress import progress_bar

    loop = _Loop(strat, evaluator, executor, jr, budget, batch)
    if not progress:
        return loop.run()
    with progress_bar() as bar:
        task = bar.add_task(f"search {strat.name}", total=budget)

        def advance() -> None:
            shown = "" if loop.best is None else f" (best feasible {loop.best:.4g})"
            bar.update(task, advance=1, description=f"search {strat.name}{shown}")

        loop.on_measured = advance
        return loop.run()


def _result(
    strat: Strategy, evaluator: Evaluator, seed: int, budget: int, evals: list[Evaluation]
) -> SearchResult:
    candidates = [e for e in evals if not e.probe]
    feasible = [e for e in candidates if e.result.feasible and e.result.metric is not None]
    best = max(feasible, key=lambda e: (e.result.metric or 0.0, -e.index)) if feasible else None
    answer = getattr(strat, "answer", None)  # a strategy's own pick among feasible ones
    if answer is not None:
        best = next((e for e in reversed(feasible) if e.policy.id == answer.id), best)
    closest = None
    if best is None and evals:
        closest = min(
            candidates or evals,
            key=lambda e: (e.result.metric is None, e.result.violation, -(e.result.metric or 0.0)),
        )
    first = None
    count = 0
    for e in evals:
        count += e.counted
        if e.result.feasible and e.result.metric is not None and not e.probe:
            first = count
            break
    cons = evaluator.constraints
    costs = cons.costs or ("size", "bops")
    return SearchResult(
        strategy=strat.name, seed=seed, budget=budget, metric=evaluator.metric_name,
        baseline_metric=evaluator.baseline, baseline_costs=evaluator.baseline_costs,
        constraints=cons, evaluations=evals, best=best, closest=closest, first_feasible=first,
        pareto=_pareto(evals, costs), notes=dict(strat.notes),
        evaluator_notes=list(evaluator.notes),
        message=_message(best, closest, evaluator.metric_name, len(evals),
                         sum(e.probe for e in evals), strat.name,
                         len(getattr(strat, "probes", ()))),
    )  # fmt: skip
