"""Fixtures of the search tests: the digits CNN trained once per session, its task, and a
search space over it (see :mod:`search_helpers`).

Decision: the search tests run torch on one thread. Their tensors are tiny (8x8 images,
16-32 channels), where a second thread only adds overhead, and two 2-thread processes on
a shared 2-core machine spin-wait for each other (measured here: 208 s with 2 threads
beside other jobs, 50 s with one).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from search_helpers import CountingTestMetric, one_thread, train_digits_model
from search_helpers import make_task as make_task
from torch import nn

from edgeslim.search import SearchSpace
from edgeslim.task import Task


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def digits_model() -> nn.Module:
    with one_thread():
        return train_digits_model()


@pytest.fixture(scope="session")
def digits_task() -> Task:
    return make_task(CountingTestMetric())


@pytest.fixture(scope="session")
def space(digits_model: nn.Module, digits_task: Task) -> SearchSpace:
    """Weight bits 2/4/8, activations 8, keep 0.5 or 1 per group: 8 searched dims."""
    return SearchSpace.build(digits_model, digits_task, w_bits=(2, 4, 8), keep=(0.5, 1.0))
