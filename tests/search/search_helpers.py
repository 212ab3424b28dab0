"""The search tests' model and task: a small residual CNN for sklearn digits (real data)
and a task split into train / validation, whose ``evaluate`` reads the digits test split
and counts its calls (a search must never make one)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgeslim.data import TensorBatches, load_digits_split
from edgeslim.task import Task
from edgeslim.train.loop import TrainConfig, evaluate, train_classifier

N_TRAIN = 1048  # of the 1348 digits training images; the other 300 validate


class DigitsNet(nn.Module):
    """conv -> residual block (conv2, conv3) -> strided conv -> mean pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv4, self.bn4 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


class CountingTestMetric:
    """The task's test metric, counting how often it is called (a search must not)."""

    def __init__(self) -> None:
        test = load_digits_split("test")
        self.data = TensorBatches(test.images, test.labels, batch_size=500)
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        return evaluate(model, self.data)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside, restored after (see conftest's decision)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_digits_model() -> DigitsNet:
    """Seeded training on the first 1048 digits training images (about a second)."""
    train = load_digits_split("train")
    torch.manual_seed(0)
    model = DigitsNet()
    batches = TensorBatches(train.images[:N_TRAIN], train.labels[:N_TRAIN], 64, shuffle=True)
    cfg = TrainConfig(epochs=12, lr=0.05, batch_size=64, seed=0, channels_last=False)
    train_classifier(model, batches, cfg, description="digits")
    return model.eval()


def make_task(test_metric: CountingTestMetric | None = None, labelled: bool = True) -> Task:
    train = load_digits_split("train")
    x, y = train.images, train.labels
    val_x, val_y = x[N_TRAIN:], y[N_TRAIN:]
    return Task(
        example_inputs=(x[:1],),
        calibration=TensorBatches(x[:256], batch_size=64),
        train=TensorBatches(x[:N_TRAIN], y[:N_TRAIN], 64, shuffle=True),
        validation=TensorBatches(val_x, val_y if labelled else None, batch_size=300),
        evaluate=test_metric,
        metric="test_top1",
        name="digits-search",
    )


class Encoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` over 6 tokens of 16 features, mean-pooled, 5
    logits: a search space splits its attention so heads are groups."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(x).mean(1))


def encoder_and_tokens() -> tuple[Encoder, torch.Tensor, Task]:
    """A seeded :class:`Encoder`, 96 random token sequences and a task over them."""
    torch.manual_seed(0)
    x = torch.randn(96, 6, 16)
    task = Task(
        example_inputs=(x[:1],),
        calibration=TensorBatches(x[:32], batch_size=32),
        validation=TensorBatches(x[32:], batch_size=64),
        name="tokens",
    )
    return Encoder().eval(), x, task
