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
