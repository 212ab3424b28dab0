"""Holding training samples out to choose a fine-tune's epoch (``hold_out``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_digits_split
from edgeslim.errors import TaskError
from edgeslim.prune.finetune import finetune_pruned
from edgeslim.train.loop import TrainConfig, evaluate, train_classifier
from edgeslim.train.selection import hold_out


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train = load_digits_split("train")
    train_classifier(model, TensorBatches(train.images, train.labels, 64, shuffle=True),
                     TrainConfig(epochs=3, lr=0.1, channels_last=False))  # fmt: skip
    return model.eval()


def test_held_samples_keep_their_labels_or_take_the_teachers_top1() -> None:
    train = load_digits_split("train")
    teacher = _teacher()
    kept, held = hold_out(TensorBatches(train.images, train.labels, 64, shuffle=True), 5)
    assert kept.num_samples + held.num_samples == len(train.labels) and kept.shuffle
    assert torch.equal(held.target, train.labels[4::5])
    _, agree = hold_out(TensorBatches(train.images, None, 64, pairs=True), 5, teacher)
    assert torch.equal(agree.inputs[0], train.images[4::5])
    with torch.no_grad():
        assert torch.equal(agree.target, teacher(train.images[4::5]).argmax(1))
    assert evaluate(teacher, agree) == 100.0  # top-1 on them is agreement with the teacher


def test_hold_out_refuses_data_it_cannot_split_or_score() -> None:
    train = load_digits_split("train")
    batches = list(TensorBatches(train.images, train.labels, 64))
    with pytest.raises(TaskError, match="needs the training data in memory"):
        hold_out(batches, 4)
    with pytest.raises(TaskError, match="have no labels"):
        hold_out(TensorBatches(train.images, None, 64, pairs=True), 4)


def test_finetune_keeps_the_teacher_like_start_when_training_only_hurts() -> None:
    train = load_digits_split("train")
    teacher = _teacher()
    student = _teacher()  # starts where the teacher is: agreement 100%
    fit, held = hold_out(TensorBatches(train.images, None, 64, pairs=True), 4, teacher)
    wild = TrainConfig(epochs=2, lr=50.0, weight_decay=0.0, channels_last=False)
    history = finetune_pruned(student, fit, wild, teacher=teacher, val=held, keep_best=True)
    assert history[-1]["best_epoch"] == 0 and evaluate(student, held) == 100.0


def test_frame_scores_are_held_out_with_frame_labels() -> None:
    """A conv's per-frame scores ``(N, C, T)``: the teacher labels each held frame (over
    the task's class axis), and top-1 on them reads per frame: the teacher scores 100%
    and a model deciding otherwise on every frame 0%."""
    from edgeslim import Task
    from edgeslim.train.selection import held_out_for_stage

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(3, 8, 1), nn.ReLU(), nn.Conv1d(8, 5, 1)).eval()
    x = torch.randn(40, 3, 12, generator=torch.Generator().manual_seed(1))
    train = TensorBatches(x, None, batch_size=8, pairs=True)
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=8))
    task.bind_reference(teacher)
    assert task.chosen_class_axis == 1
    _, held = held_out_for_stage(train, 4, teacher, task)
    assert held.target is not None and tuple(held.target.shape) == (10, 12)
    assert evaluate(teacher, held) == 100.0

    class Shifted(nn.Module):  # the teacher's frames decided for the next class
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return teacher(inp).roll(1, dims=1)

    assert evaluate(Shifted(), held) == 0.0


def test_the_held_score_is_named_agreement_when_the_teacher_labels_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unlabelled training data is held out with the teacher's top-1 as labels: the log
    said `val_top1=` for what is agreement with the teacher."""
    from edgeslim.train.selection import held_score_name, kept_note

    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    assert held_score_name(TensorBatches(x, y)) == "val_top1"
    unlabelled = TensorBatches(x, None, 8, pairs=True)
    assert held_score_name(unlabelled) == "val_agreement"
    teacher = nn.Linear(6, 3).eval()
    fit, held = hold_out(unlabelled, 4, teacher)
    model = nn.Linear(6, 3)
    from edgeslim.distill import kd_loss

    history = train_classifier(model, fit, TrainConfig(epochs=1, lr=0.01), val=held,
                               loss_fn=kd_loss(teacher), keep_best=True,
                               val_name="val_agreement")  # fmt: skip
    assert "val_agreement=" in capsys.readouterr().out
    assert "agreement on 8 held-out" in kept_note(history, held, "val_agreement")
