"""Shared fixtures: real data is small-subset loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Two threads, like CI and the benchmarks; EDGESLIM_TEST_THREADS=1 when another job shares
# the cores (two 2-thread torch processes on 2 cores spin-wait for each other).
torch.set_num_threads(int(os.environ.get("EDGESLIM_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def fmnist_test_small():  # type: ignore[no-untyped-def]
    from edgeslim.data import load_fashion_mnist

    return load_fashion_mnist("test", limit=512)
