"""Automated compression: search per-layer bits and keep ratios under constraints.

``search(model, task, constraints=["size<=0.25x"], max_drop=1.0, strategy="evolutionary")``
builds a :class:`SearchSpace` (bits per quantizable layer, keep ratios per prunable group),
screens every proposed :class:`Policy` against the analytic constraints, measures the rest
on the task's validation data, journals every result, and returns a :class:`SearchResult`
with the best feasible policy (or says plainly that none was found). See docs/search.md.
"""

from edgeslim.search.constraints import (
    Check,
    Constraint,
    Constraints,
    LatencyPredictor,
)
from edgeslim.search.errors import ConstraintError, JournalError, PolicyError, SearchError
from edgeslim.search.evaluate import EvalResult, Evaluator
from edgeslim.search.executor import Executor, LocalExecutor
from edgeslim.search.journal import Journal
from edgeslim.search.policy import Policy, load_policy
from edgeslim.search.run import Evaluation, SearchResult, search
from edgeslim.search.space import Costs, Dim, SearchSpace
from edgeslim.search.strategies import STRATEGIES, Context, Strategy, make_strategy, reward

__all__ = [
    "STRATEGIES",
    "Check",
    "Constraint",
    "ConstraintError",
    "Constraints",
    "Context",
    "Costs",
    "Dim",
    "EvalResult",
    "Evaluation",
    "Evaluator",
    "Executor",
    "Journal",
    "JournalError",
    "LatencyPredictor",
    "LocalExecutor",
    "Policy",
    "PolicyError",
    "SearchError",
    "SearchResult",
    "SearchSpace",
    "Strategy",
    "load_policy",
    "make_strategy",
    "reward",
    "search",
]
