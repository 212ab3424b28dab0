"""Per-frame labels ``(N, T)`` for a Conv1d model's ``(N, C, T)`` scores: the class axis is
the one the labels lack, for the loss and for top-1."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.data import TensorBatches
from edgeslim.train.loop import (
    TrainConfig,
    cross_entropy,
    evaluate,
    labels_class_axis,
    top1_hits,
    train_classifier,
)


def test_the_axis_the_labels_lack_holds_the_classes() -> None:
    scores = torch.zeros(2, 5, 7)
    assert labels_class_axis(scores, torch.zeros(2, 7, dtype=torch.long)) == 1
    assert labels_class_axis(scores, torch.zeros(2, 5, dtype=torch.long)) is None  # (N, T, C)
    assert labels_class_axis(torch.zeros(2, 5, 5), torch.zeros(2, 5)) is None  # ambiguous


def test_top1_and_the_loss_read_per_frame() -> None:
    scores = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(0))
    labels = scores.argmax(1)
    assert top1_hits(scores, labels) == 27
    want = nn.functional.cross_entropy(scores, labels)  # torch's own (N, C, T) layout
    torch.testing.assert_close(cross_entropy(scores, labels), want)


def test_a_frame_classifier_learns_from_frame_labels() -> None:
    """Label each frame by the sign pattern of two input channels (4 classes); a small
    Conv1d net trained on those labels beats chance by far."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 16, generator=g)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 1), nn.ReLU(), nn.Conv1d(16, 4, 1))
    train = TensorBatches(x[:192], y[:192], batch_size=32, shuffle=True)
    test = TensorBatches(x[192:], y[192:], batch_size=64)
    before = evaluate(model, test)
    train_classifier(model, train, TrainConfig(epochs=8, lr=0.05))
    after = evaluate(model, test)
    assert after > 85.0 and after > before + 30.0, (before, after)
