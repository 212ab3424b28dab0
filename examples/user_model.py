"""A user's own model and task, for `edgeslim ... module:function` (run from this folder).

    cd examples
    python -c "import user_model; user_model.write_npz('samples.npz')"
    edgeslim info user_model:build --input-shape 1,3,32,32
    edgeslim compress user_model:build --recipe w8a8.yaml --data samples.npz --out w8a8-out
    edgeslim compress user_model:build --recipe w8a8.yaml --data user_model:task --out w8a8-out

Replace the random weights and samples with your trained model and real inputs: the
figures are then about your model. Agreement needs no labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeslim import Task, TensorBatches


def build() -> nn.Module:
    """A 3-channel 32x32 CNN (seeded random weights stand in for trained ones)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def samples(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def write_npz(path: str) -> None:
    """Inputs as array `x` (add `y` with integer labels for top-1 instead of agreement)."""
    np.savez(path, x=samples().numpy())


def task() -> Task:
    """The same data as a Task: calibrate on 96 samples, measure agreement on 32 others."""
    x = samples()
    return Task(
        example_inputs=(x[:1],),
        calibration=TensorBatches(x[:96], batch_size=32),
        validation=TensorBatches(x[96:], batch_size=32),
        name="user-samples",
    )
