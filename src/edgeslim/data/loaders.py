"""Minimal in-memory batching (the datasets fit in memory; no DataLoader workers needed)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from edgeslim.data.fashion_mnist import Split


def batches(
    split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches; the last batch may be smaller."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]
