"""``RayExecutor``: the measurements of one batch in parallel, on Ray worker processes.

Ray is an optional extra (``pip install 'edgeslim[ray]'``); importing this module does not
import it, building a :class:`RayExecutor` does. By default a local Ray runtime is started
on this machine with ``workers`` CPUs, no dashboard and every service bound to the loopback
address; with ``address=`` (``"ray://host:10001"`` or ``"auto"``) it joins a cluster.

Decision — shipping the evaluator: the search loop hands the executor
``evaluator.measure``, a bound method whose evaluator carries the model, the task and the
search space (pruned copies, importance scores, the traced graph). Pickling that per
policy would cost more than many measurements, so it is put in the Ray object store once
per evaluator and each worker (a long-lived actor) loads it on its first call and keeps it;
policies travel alone. The evaluator's baseline (metric and costs) is measured here before
shipping, so no worker re-measures the float model.

Decision — threads: each actor asks Ray for one CPU and runs torch on one thread, so
``workers`` actors fill ``workers`` cores without oversubscribing them (two 2-thread
processes on two cores spin-wait for each other and run slower than one).

Decision — closing waits for the workers to exit: ``close`` returns once the local actors'
processes and the runtime services it started are gone, up to
:data:`CLOSE_WAIT` seconds. Why: a process still tearing down shares the cores with
whatever is timed next. ``bench search`` verified the same resnet20 policy at 0.516x fp32
after the in-process search and at 0.649x right after the Ray run's shutdown (2026-12-06,
commit b441b45), breaking the 0.6x limit it met. ``edgeslim search`` closes the executor
before it times the chosen candidates for the same reason.

Determinism: results are returned in the batch's order (:class:`ray.util.ActorPool`
``map`` keeps it), and the search loop, not the executor, forms batches, so the same seed
and batch give the same search as :class:`~edgeslim.search.LocalExecutor`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from edgeslim.runtime.processes import children, wait_exited
from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult, Evaluator
from edgeslim.search.executor import MeasureFn
from edgeslim.search.policy import Policy

INSTALL_HINT = "pip install 'edgeslim[ray]'"
CLOSE_WAIT = 30.0  # seconds close() waits for local worker processes to exit


def import_ray() -> ModuleType:
    """Ray, or a :class:`SearchError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise SearchError(
            f"the Ray executor needs the optional dependency ray ({exc}); install it with "
            f"{INSTALL_HINT}, or use the in-process LocalExecutor"
        ) from None
    return ray


class _Worker:
    """One Ray actor: loads the measure function once per search, then measures policies."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.key: str | None = None
        self.fn: MeasureFn | None = None

    def threads(self) -> int:
        import torch

        return int(torch.get_num_threads())

    def pid(self) -> int:
        return os.getpid()

    def measure(self, key: str, holder: list[Any], policy: Policy) -> EvalResult:
        # ``holder`` wraps the ObjectRef so Ray does not fetch and unpickle it on every call
        if key != self.key:
            import ray

            self.fn, self.key = ray.get(holder[0]), key
        assert self.fn is not None
        return self.fn(policy)


class RayExecutor:
    """Measures a batch's policies on ``workers`` Ray actors, results in the batch's order.

    ``address=None`` starts (or reuses) a local Ray runtime with ``workers`` CPUs, loopback
    only; otherwise it is passed to ``ray.init`` to join that cluster. ``runtime_env`` goes
    to ``ray.init`` too (e.g. ``{"env_vars": {"PYTHONPATH": ...}}`` when the model's class
    lives in a module the workers cannot import). Call :meth:`close` (or use ``with``) to
    stop the actors and the runtime this executor started.
    """

    def __init__(
        self,
        workers: int = 2,
        address: str | None = None,
        *,
        threads_per_worker: int = 1,
        runtime_env: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise SearchError(f"workers must be a positive number of processes; got {workers!r}")
        self.ray = import_ray()
        self.workers = workers
        self.address = address
        self.threads_per_worker = threads_per_worker
        self._runtime_env = dict(runtime_env or {})
        self._owns_runtime = False
        self._services: list[int] = []  # process ids of the runtime this executor started
        self._actors: list[Any] = []
        self._fn: MeasureFn | None = None
        self._key = ""
        self._ref: Any = None

    # --- lifecycle --------------------------------------------------------------------------

    def _start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            # no usage report leaves the machine, and nothing listens beyond loopback
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self._runtime_env:
                kwargs["runtime_env"] = self._runtime_env
            if self.address is None:
                kwargs.update(num_cpus=self.workers, _node_ip_address="127.0.0.1")
            else:
                kwargs["address"] = self.address
            before = set(children())
            ray.init(**kwargs)
            self._owns_runtime = True
            self._services = sorted(set(children()) - before)  # what ray.init started
        actor = ray.remote(num_cpus=1)(_Worker)
        self._actors = [actor.remote(self.threads_per_worker) for _ in range(self.workers)]

    def close(self) -> None:
        """Stop the actors, and the Ray runtime when this executor started it; with a
        local runtime, return once their processes have exited (see the module doc)."""
        pids = self.worker_pids() if self.address is None else []
        for a in self._actors:
            self.ray.kill(a)
        self._actors, self._fn, self._ref = [], None, None
        services, self._services = self._services, []
        if self._owns_runtime and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_runtime = False
        wait_exited([*pids, *services], CLOSE_WAIT)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """Process ids of the running actors (empty when none runs or they do not answer)."""
        if not self._actors:
            return []
        try:
            return [int(p) for p in self.ray.get([a.pid.remote() for a in self._actors],
                                                 timeout=10)]  # fmt: skip
        except Exception:  # a dead actor: nothing left to wait for on its account
            return []

    def worker_threads(self) -> list[int]:
        """torch's thread count in each worker (1 by default)."""
        if not self._actors:
            self._start()
        return [int(n) for n in self.ray.get([a.threads.remote() for a in self._actors])]

    # --- Executor protocol -------------------------------------------------------------------

    def _ship(self, fn: MeasureFn) -> None:
        """Put ``fn`` (with its evaluator) in the object store unless it is already there."""
        if self._fn is not None and fn == self._fn:
            return
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, Evaluator):  # measured once here, not once per worker
            _ = owner.baseline, owner.baseline_costs
        self._fn, self._key, self._ref = fn, uuid.uuid4().hex, self.ray.put(fn)

    def run(self, fn: MeasureFn, policies: Sequence[Policy]) -> Iterator[EvalResult]:
        """Measure ``policies`` on the workers; yield each result in the policies' order, as
        soon as it and every one before it are done."""
        if not policies:
            return iter(())
        if not self._actors:
            self._start()
        self._ship(fn)
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        key, holder = self._key, [self._ref]
        return pool.map(lambda a, p: a.measure.remote(key, holder, p), list(policies))


__all__ = ["CLOSE_WAIT", "INSTALL_HINT", "RayExecutor", "import_ray"]
