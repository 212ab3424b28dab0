"""Executors: who runs the measurements of one batch of asked policies.

The search loop hands an executor the evaluator's ``measure`` function and the batch's
policies that need measuring; the executor returns their results **in the same order**,
however it schedules them. Batches are formed by the loop (``batch`` policies asked before
any result is told), not by the executor, so a parallel executor
(:class:`~edgeslim.search.ray_executor.RayExecutor`, optional) gives the same search as
:class:`LocalExecutor` for the same seed and batch.

An executor for other processes must ship ``fn`` there: the evaluator pickles with its
model, task and space (use cloudpickle for tasks holding lambdas).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy

MeasureFn = Callable[[Policy], EvalResult]


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn`` on every policy and yields the results in the policies' order."""

    def run(self, fn: MeasureFn, policies: Sequence[Policy]) -> Iterator[EvalResult]: ...


class LocalExecutor:
    """In this process, one policy after another; each result is yielded as soon as it is
    measured, so the journal records it before the next measurement starts."""

    def run(self, fn: MeasureFn, policies: Sequence[Policy]) -> Iterator[EvalResult]:
        for policy in policies:
            yield fn(policy)
