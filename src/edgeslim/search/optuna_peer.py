"""Peer strategies: Optuna's TPE and NSGA-II samplers behind edgeslim's ask/tell interface.

These are **peers**, not edgeslim's own algorithms: the off-the-shelf hyper-parameter
optimiser a user would reach for, run through the same :func:`~edgeslim.search.search`
loop (same space, screening, validation metric, journal and budget) so that ``edgeslim
bench search`` compares strategies at equal cost. Optuna is an optional dependency
(``pip install 'edgeslim[peers]'``), imported only when one of them is built.

Mapping, chosen to be how a user would set Optuna up, not tuned for it:

- every searched coordinate of the space (``space.dims``) is one categorical parameter
  named by its label (``w_bits[conv1]``), over its choice indices;
- the objective is the validation metric relative to the float model (0 for a policy the
  analytic constraints rejected unmeasured), maximised;
- constraints go through Optuna's own ``constraints_func``: one value per constraint (its
  excess over the limit, 0 when met), feasible when all are <= 0;
- ``optuna-nsga2`` adds a second objective, the first constrained cost relative to fp32
  (size by default), minimised, so it searches the metric/cost front as NSGA-II intends.

The loop may ask a batch before telling; each asked policy keeps its Optuna trial until its
result is told. Seeded: the same seed and the same results give the same proposals.
"""

from __future__ import annotations

import warnings
from collections import defaultdict, deque
from typing import Any

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context

INSTALL_HINT = "pip install 'edgeslim[peers]'"
_CONSTRAINTS_ATTR = "edgeslim_constraints"


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise SearchError(
            f"the Optuna peer strategies need the optional dependency optuna ({exc}); install "
            f"it with {INSTALL_HINT}"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _constraints(trial: Any) -> list[float]:
    """Optuna's ``constraints_func``: the excesses stored on the trial when it was told."""
    return list(trial.user_attrs.get(_CONSTRAINTS_ATTR, [0.0]))


class OptunaPeer:
    """Shared ask/tell plumbing of the Optuna peers (see the module doc)."""

    name = "optuna"
    multi_objective = False

    def __init__(self, ctx: Context) -> None:
        self.optuna = _import_optuna()
        self.ctx = ctx
        self.space = ctx.space
        self.notes: dict[str, Any] = {"peer": f"optuna {self.optuna.__version__}"}
        self.limits = ctx.constraints.to_list()  # one constraint value each, in this order
        self.cost = ctx.constraints.costs[0] if ctx.constraints.costs else "size"
        dist = self.optuna.distributions.CategoricalDistribution
        self.dists = {d.label: dist(list(range(len(d.choices)))) for d in self.space.dims}
        with warnings.catch_warnings():  # constraints_func is marked experimental
            warnings.simplefilter("ignore")
            sampler = self.make_sampler(ctx.seed)
        directions = ["maximize", "minimize"] if self.multi_objective else ["maximize"]
        self.study = self.optuna.create_study(directions=directions, sampler=sampler)
        self.pending: dict[str, deque[Any]] = defaultdict(deque)

    def make_sampler(self, seed: int) -> Any:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return False

    def is_probe(self, policy: Policy) -> bool:
        return False

    def ask(self) -> Policy | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self.study.ask(self.dists)
        genes = [int(trial.params[d.label]) for d in self.space.dims]
        policy = self.space.decode(genes)
        self.pending[policy.id].append(trial)
        return policy

    def tell(self, policy: Policy, result: EvalResult) -> None:
        queue = self.pending.get(policy.id)
        if not queue:
            raise SearchError(f"{self.name}: told policy {policy.id}, which it did not ask")
        trial = queue.popleft()
        excess = {c.constraint: c.excess for c in result.checks}
        trial.set_user_attr(_CONSTRAINTS_ATTR, [float(excess.get(k, 0.0)) for k in self.limits])
        scale = max(abs(result.baseline), 1e-9)
        metric = 0.0 if result.metric is None else result.metric / scale
        values = [metric]
        if self.multi_objective:
            values.append(float(result.relative.get(self.cost, 1.0)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study.tell(trial, values)


class OptunaTPE(OptunaPeer):
    """Peer: Optuna's TPE sampler (defaults, plus the constraints), one objective."""

    name = "optuna-tpe"

    def __init__(self, ctx: Context, startup: int = 10) -> None:
        self.startup = startup
        super().__init__(ctx)

    def make_sampler(self, seed: int) -> Any:
        return self.optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=self.startup, constraints_func=_constraints
        )


class OptunaNSGA2(OptunaPeer):
    """Peer: Optuna's NSGA-II sampler on (metric, constrained cost) with the constraints.

    ``population`` defaults to 8 instead of Optuna's 50: at a search budget of a few dozen
    measurements, 50 would leave NSGA-II in its random first generation.
    """

    name = "optuna-nsga2"
    multi_objective = True

    def __init__(self, ctx: Context, population: int = 8) -> None:
        self.population = population
        super().__init__(ctx)

    def make_sampler(self, seed: int) -> Any:
        return self.optuna.samplers.NSGAIISampler(
            population_size=self.population, seed=seed, constraints_func=_constraints
        )


PEERS = {"optuna-tpe": OptunaTPE, "optuna-nsga2": OptunaNSGA2}

__all__ = ["INSTALL_HINT", "PEERS", "OptunaNSGA2", "OptunaPeer", "OptunaTPE"]
