"""Recipe stage ``finetune`` on training data without labels: distilled from the
uncompressed model instead of failing for want of labels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.task import Task


def test_finetune_on_unlabelled_data_distils_from_the_uncompressed_model(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x = torch.randn(96, 12)
    task = Task(
        example_inputs=(x[:1],),
        calibration=TensorBatches(x[:64], batch_size=32),
        train=TensorBatches(x[:64], None, 32, shuffle=True, pairs=True),
        validation=TensorBatches(x[64:], batch_size=32),
        name="unlabelled",
    )
    recipe = {"name": "ft", "stages": [{"kind": "finetune", "epochs": 1, "lr": 0.01}]}
    result = edgeslim.compress(model, recipe, task, tmp_path / "out", quick=True)
    # trained towards its own outputs: agreement stays (it failed for want of labels before)
    assert result.records[0].value >= 90.0
    assert any(n.startswith("finetune: 1 epoch") for n in result.notes)
