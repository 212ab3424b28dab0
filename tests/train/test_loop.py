from __future__ import annotations

import torch
from torch import nn

from edgeslim.data import load_digits_split
from edgeslim.train.loop import TrainConfig, augment_batch, evaluate, train_classifier


def test_augment_is_a_shift_or_flip_of_the_input() -> None:
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)  # min 0 = pad value
    out = augment_batch(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):
        nonzero = set(out[i][out[i] > 0].tolist())
        assert nonzero <= set(x[i].flatten().tolist())
        assert len(nonzero) >= 24  # at most one row and one column dropped


def test_training_learns_digits_and_is_reproducible() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    cfg = TrainConfig(epochs=3, lr=0.1, batch_size=64, augment=False, channels_last=False)
    a, b = make(), make()
    before = evaluate(a, test)
    hist = train_classifier(a, train, cfg, val=test)
    train_classifier(b, train, cfg)
    assert before < 30 and evaluate(a, test) > 85
    assert hist[-1]["loss"] < hist[0]["loss"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
