"""Recipe stage ``finetune`` on training data without labels: distilled from the
uncompressed model instead of failing for want of labels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.task import Task


def _unlabelled() -> tuple[nn.Module, Task]:
    """A small model and a task whose 64 training samples have no labels."""
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
    return model, task


def test_finetune_on_unlabelled_data_distils_from_the_uncompressed_model(
    tmp_path: Path,
) -> None:
    model, task = _unlabelled()
    recipe = {"name": "ft", "stages": [{"kind": "finetune", "epochs": 1, "lr": 0.01}]}
    result = edgeslim.compress(model, recipe, task, tmp_path / "out", quick=True)
    # trained towards its own outputs: agreement stays (it failed for want of labels before)
    assert result.records[0].value >= 90.0
    assert any(n.startswith("finetune: 1 epoch") for n in result.notes)


def test_select_every_keeps_the_model_as_it_came_when_no_epoch_beats_it(tmp_path: Path) -> None:
    """Distilled from itself the model starts at 100% agreement on the held samples: no
    epoch can beat that, so the stage keeps the weights it was given, whatever the rate."""
    model, task = _unlabelled()
    stage = {"kind": "finetune", "epochs": 2, "lr": 1.0, "select_every": 4}
    result = edgeslim.compress(model, {"name": "ft", "stages": [stage]}, task, tmp_path / "o")
    note = next(n for n in result.notes if n.startswith("finetune: 2 epoch"))
    # unlabelled: the held samples carry the teacher's top-1, so the figure is agreement
    # (the log and the note called it top-1)
    assert "kept the model before training (100.00% agreement on 16 held-out training" in note
    assert result.records[0].value == 100.0
