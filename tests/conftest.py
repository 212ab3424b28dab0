"""Shared fixtures: real data is small-subset loaded once per session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_test_small():  # type: ignore[no-untyped-def]
    from edgeslim.data import load_fashion_mnist

    return load_fashion_mnist("test", limit=512)
