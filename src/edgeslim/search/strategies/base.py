"""The ask/tell interface every strategy implements, its registry and shared helpers.

A strategy proposes policies (``ask``) and learns from their results (``tell``); the search
loop decides how results are obtained (screened, measured, replayed from a journal), so a
strategy never evaluates anything itself. The loop may ask several policies before telling
any (a batch, evaluated in parallel by an executor) and always tells results in ask order,
so a seeded strategy makes the same choices whatever executor runs the batch.

``ask`` returns None when the strategy must hear pending results before proposing more, or
has ``finished`` (greedy, dp and accuracy_aware end on their own). ``is_probe(policy)``
(asked right after ``ask``) marks a measurement the strategy needs that is not a candidate
answer (a per-layer sensitivity probe): it is measured even when it breaks an analytic
constraint, and never reported as the best policy; any other policy that breaks one is
rejected unmeasured. A strategy whose goal is not the best metric may set an ``answer``
attribute (a policy it asked): when that one was measured feasible it is the search's
result instead of the most accurate feasible policy (``accuracy_aware``: fewest layers
given back within ``max_drop``).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from edgeslim.registry import Registry
from edgeslim.search.constraints import Check, Constraints
from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.space import SearchSpace


@runtime_checkable
class Strategy(Protocol):
    """Ask/tell search strategy (see the module doc)."""

    name: str
    notes: dict[str, Any]

    def ask(self) -> Policy | None: ...

    def tell(self, policy: Policy, result: EvalResult) -> None: ...

    @property
    def finished(self) -> bool: ...

    def is_probe(self, policy: Policy) -> bool: ...


@dataclass(frozen=True)
class Context:
    """What a strategy is built with: the space, the constraints, the seed, and a cheap
    analytic check of a policy (no accuracy measured)."""

    space: SearchSpace
    constraints: Constraints
    seed: int
    checks: Callable[[Policy], tuple[Check, ...]]
    budget: int | None = None  # measurements the search may make (None: not said)


StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("search strategy")
S = TypeVar("S")


def register(name: str) -> Callable[[S], S]:
    """Class decorator: register a strategy class (called as ``cls(ctx, **options)``)."""

    def add(cls: S) -> S:
        STRATEGIES.register(name, cls)  # type: ignore[arg-type]
        return cls

    return add


def _factory(name: str) -> StrategyFactory:
    from edgeslim.search import strategies  # noqa: F401  (registers the built-ins)

    try:
        return STRATEGIES.get(name)
    except KeyError as exc:
        raise SearchError(str(exc.args[0])) from None


def strategy_options(name: str) -> dict[str, Any]:
    """The options the strategy registered as ``name`` takes, with their defaults: the
    keyword parameters of its constructor after the context (what ``--option`` on the
    command line and ``options:`` in a recipe's search stage accept)."""
    params = list(inspect.signature(_factory(name)).parameters.values())[1:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in named}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse option names the strategy does not take, naming the ones it does (values
    are checked by the strategy itself when it is built, before anything is measured)."""
    allowed = strategy_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()) or "none"
        raise SearchError(
            f"strategy {name!r} has no option {', '.join(map(repr, unknown))}; its options: {takes}"
        )


def make_strategy(name: str, ctx: Context, **options: Any) -> Strategy:
    """Build the strategy registered as ``name``; unknown names and options fail clearly."""
    factory = _factory(name)
    check_options(name, options)
    try:
        return factory(ctx, **options)
    except TypeError as exc:
        raise SearchError(f"strategy {name!r}: {exc}") from None


def reward(result: EvalResult) -> float:
    """One scalar every strategy ranks by: feasibility first, then the metric.

    A feasible policy scores its metric relative to the uncompressed model's (1.0 = no
    loss); an infeasible one scores that minus 1 minus its total excess over the limits
    (a policy rejected unmeasured counts metric 0), so any feasible policy with a positive
    metric outranks every infeasible one, and among infeasible ones the closer wins.
    """
    rel = relative_metric(result)
    return rel if result.feasible else rel - 1.0 - result.violation


def relative_metric(result: EvalResult) -> float:
    """The metric over the uncompressed model's (1.0 = no loss); 0 when not measured."""
    if result.metric is None:
        return 0.0
    return result.metric / max(abs(result.baseline), 1e-9)


def sensitivity(probe: EvalResult, ref: EvalResult) -> float:
    """How much worse ``probe`` is than ``ref``: the loss increase when both losses were
    measured (smoother than top-1 on small data), else the metric drop."""
    if probe.loss is not None and ref.loss is not None:
        return probe.loss - ref.loss
    if probe.metric is None or ref.metric is None:
        raise SearchError("a sensitivity probe was not measured")
    return ref.metric - probe.metric


def hessian_prices(
    space: SearchSpace, notes: dict[str, Any], keep: bool = False
) -> dict[int, list[float]]:
    """Per coordinate (index into ``space.dims``), the loss increase each choice is
    predicted to cost over the least compressed one, from one Hessian-trace estimate
    (:mod:`edgeslim.search.hessian`); no measurement. Weight-bit coordinates always; with
    ``keep``, keep-ratio coordinates too (:func:`~edgeslim.search.hessian.keep_sensitivity`).
    Coordinates it cannot price (layers with several weight tensors, groups read by such
    layers) are absent; when it is unavailable altogether the result is empty and
    ``notes["hessian_unavailable"]`` says why."""
    from edgeslim.search.hessian import keep_sensitivity, weight_bits_sensitivity

    try:
        layers = weight_bits_sensitivity(space)
        groups = keep_sensitivity(space) if keep else {}
    except (SearchError, RuntimeError) as exc:  # e.g. an op without a second derivative
        notes["hessian_unavailable"] = f"{exc}; those coordinates are probed instead"
        return {}
    out: dict[int, list[float]] = {}
    for d, dim in enumerate(space.dims):
        if dim.kind == "w_bits" and dim.name in layers:
            inc = layers[dim.name].loss_increase
            out[d] = [max(inc[b] - inc[dim.choices[-1]], 0.0) for b in dim.choices]
        elif dim.kind == "keep" and dim.name in groups:
            price = groups[dim.name]
            out[d] = [max(price[k] - price[dim.choices[-1]], 0.0) for k in dim.choices]
    notes["hessian_trace_per_weight"] = {f: round(s.trace_per_weight, 6) for f, s in layers.items()}
    return out


class GeneStrategy:
    """Shared plumbing of the built-ins: policies as choice indices (genes) over
    ``space.dims``, a seeded ``random.Random``, and the set of policies already asked."""

    name = "base"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.space = ctx.space
        self.sizes = [len(d.choices) for d in self.space.dims]
        self.rng = random.Random(ctx.seed)
        self.notes: dict[str, Any] = {}
        self.seen: set[str] = set()
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def is_probe(self, policy: Policy) -> bool:
        return False

    def policy(self, genes: Sequence[int]) -> Policy:
        return self.space.decode(genes)

    def random_genes(self) -> list[int]:
        return [self.rng.randrange(n) for n in self.sizes]

    def unseen(self, make: Callable[[], list[int]], tries: int = 50) -> list[int] | None:
        """Genes from ``make`` not asked before (None when ``tries`` draws all were)."""
        if len(self.seen) >= self.space.cardinality:
            return None
        for _ in range(tries):
            genes = make()
            if self.policy(genes).id not in self.seen:
                return genes
        return None

    def mark(self, genes: Sequence[int]) -> Policy:
        p = self.policy(genes)
        self.seen.add(p.id)
        return p

    def warm_start(self, limit: int) -> list[list[int]]:
        """Up to ``limit`` uniform policies of the space (same bits and keep ratio
        everywhere) that pass every analytic constraint and were not asked before: the
        starting points a practitioner tries first. A population seeded with them holds a
        feasible policy from the start when any uniform one is, where random draws of a
        space with pruning choices are almost never within an accuracy limit without
        fine-tuning (resnet20: 0 of 24).

        When more pass than ``limit``, they are spread over the compression range (ordered
        by BOPs, then size): the most compressed, the least compressed and evenly spaced
        between. The least compressed is the one most likely to hold an accuracy limit;
        taking the first ones in the order of bits, then keep (as until 2026-12-06), left
        abc and reinforce on mobilenetv2-imagenet with four uniform seeds that all broke
        it, and nothing feasible in 28 measurements, while the fifth, W8A8, held it. Asked
        most compressed first."""
        fits = [
            p for p in self.space.uniforms()
            if p.id not in self.seen and all(c.ok for c in self.ctx.checks(p))
        ]  # fmt: skip
        costs = {p.id: self.space.costs(p) for p in fits}  # one analytic pass per policy
        fits.sort(key=lambda p: (costs[p.id].bops, costs[p.id].size))
        n = len(fits)
        if n > limit:
            picks = (
                [n - 1] if limit == 1 else [round(i * (n - 1) / (limit - 1)) for i in range(limit)]
            )
            fits = [fits[i] for i in picks]
        out = [list(self.space.encode(p)) for p in fits]
        self.seen.update(p.id for p in fits)
        self.notes["warm_start"] = [p.describe() for p in fits]
        return out
