"""The Ray executor: two worker processes give the same search as the in-process executor
for the same seed, each worker runs torch on one thread, and a missing Ray says how to
install it (without ``import edgeslim.search`` ever importing Ray)."""

from __future__ import annotations

import builtins
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from edgeslim.runtime.processes import wait_exited
from edgeslim.search import Executor, SearchError, SearchSpace, search
from edgeslim.search.ray_executor import RayExecutor
from edgeslim.task import Task

HELPERS = str(Path(__file__).parent)  # search_helpers (DigitsNet) for the workers to import


@pytest.fixture(scope="module")
def ray_pool() -> Iterator[RayExecutor]:
    """One local Ray runtime for the module (starting one costs seconds)."""
    pytest.importorskip("ray")
    ex = RayExecutor(workers=2, runtime_env={"env_vars": {"PYTHONPATH": HELPERS}})
    try:
        yield ex
    finally:
        ex.close()


@pytest.fixture(scope="module")
def sp(digits_model: nn.Module, digits_task: Task) -> SearchSpace:
    return SearchSpace.build(
        digits_model, digits_task, w_bits=(4, 6, 8), keep=(0.75, 1.0), calibration=128
    )


def test_two_workers_give_the_local_search(ray_pool: RayExecutor, sp: SearchSpace) -> None:
    assert isinstance(ray_pool, Executor)
    assert ray_pool.worker_threads() == [1, 1]
    runs = []
    for ex in (None, ray_pool):
        result = search(
            sp.model, sp.task, sp, ["size<=0.2x"], "evolutionary", budget=8, seed=5, batch=4,
            max_drop=2.0, executor=ex, progress=False, options={"population": 4},
        )  # fmt: skip
        runs.append(result)
    local, remote = (
        [(e.policy.id, e.source, e.result.metric) for e in r.evaluations] for r in runs
    )
    assert local == remote
    assert sum(s == "measured" for _, s, _ in remote) == 8
    assert runs[0].best is not None and runs[1].best is not None
    assert runs[0].best.policy == runs[1].best.policy
    assert runs[0].best.result.metric == runs[1].best.result.metric
    # the measured figures are the workers' own: not a copy of a driver-side cache
    assert all(e.result.seconds > 0 for e in runs[1].evaluations if e.source == "measured")


def test_close_returns_once_the_workers_have_exited(ray_pool: RayExecutor) -> None:
    """Whatever is timed after a Ray search must not share the cores with workers still
    exiting; a closed executor starts afresh when used again."""
    ray_pool.worker_threads()  # the actors up
    pids = ray_pool.worker_pids()
    assert len(pids) == 2 and wait_exited(pids, 0.0) == pids  # both running
    ray_pool.close()
    assert wait_exited(pids, 0.0) == []
    assert ray_pool.worker_pids() == []
    assert ray_pool.worker_threads() == [1, 1]


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SearchError, match=r"pip install 'edgeslim\[ray\]'"):
        RayExecutor(workers=2)


def test_bad_worker_count_is_refused() -> None:
    with pytest.raises(SearchError, match="workers"):
        RayExecutor(workers=0)


def test_importing_search_does_not_import_ray() -> None:
    code = "import sys, edgeslim.search; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
