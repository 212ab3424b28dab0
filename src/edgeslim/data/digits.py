"""sklearn's bundled 8x8 digits, the tiny real dataset for unit tests."""

from __future__ import annotations

import torch

from edgeslim.data.fashion_mnist import Split


def load_digits_split(split: str = "train", test_fraction: float = 0.25) -> Split:
    """Digits as ``(N, 1, 8, 8)`` float32 in [0, 1] with a fixed train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * test_fraction)
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return Split(x[idx], y[idx])
