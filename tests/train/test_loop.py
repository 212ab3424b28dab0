from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_digits_split
from edgeslim.train.loop import TrainConfig, evaluate, steps_per_epoch, train_classifier

CFG = TrainConfig(epochs=3, lr=0.1, batch_size=64, channels_last=False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_training_learns_digits_and_is_reproducible() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    test_batches = TensorBatches(test.images, test.labels, 500)

    def batches() -> TensorBatches:
        return TensorBatches(train.images, train.labels, 64, shuffle=True, seed=0)

    a, b = mlp(), mlp()
    before = evaluate(a, test_batches)
    hist = train_classifier(a, batches(), CFG, val=test_batches)
    train_classifier(b, batches(), CFG)
    assert before < 30 and evaluate(a, test_batches) > 85
    assert evaluate(a, test) == evaluate(a, test_batches)  # a Split is batched for you
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["val_top1"] > 85
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


class TwoInputs(nn.Module):
    """Digits split into top and bottom halves, one input each; logits plus an extra output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.top, self.bottom = nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, top: torch.Tensor, bottom: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.relu(self.top(top.flatten(1)) + self.bottom(bottom.flatten(1)))
        return self.head(h), h


def halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[:, :, :4], images[:, :, 4:]


def test_a_two_input_model_trains_from_a_list_of_batches() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    data = [
        (halves(train.images[i : i + 64]), train.labels[i : i + 64])
        for i in range(0, len(train), 64)
    ]
    model = TwoInputs()
    val = [(halves(test.images), test.labels)]
    hist = train_classifier(model, data, CFG, val=val)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert evaluate(model, val) > 85  # the first output is the logits


class NoLength:
    """Re-iterable batches without ``__len__`` (a streaming source)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.served = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.served += 1
            yield batch


def test_steps_are_counted_by_one_pass_without_a_length() -> None:
    train = load_digits_split("train")
    data = NoLength([((train.images[i : i + 100],), train.labels[i : i + 100]) for i in (0, 100)])
    assert steps_per_epoch(data) == 2 and data.served == 2
    hist = train_classifier(mlp(), data, TrainConfig(epochs=2, channels_last=False))
    assert len(hist) == 2 and data.served == 2 + 2 + 2 * 2  # one pass to count, two epochs


def test_a_one_shot_generator_is_refused() -> None:
    train = load_digits_split("train")
    gen = (((x,), y) for x, y in zip(train.images.split(64), train.labels.split(64), strict=True))
    with pytest.raises(ValueError, match="one-shot"):
        train_classifier(mlp(), gen, CFG)
    data = [((train.images[:64],), train.labels[:64])]
    with pytest.raises(ValueError, match="one-shot"):
        train_classifier(mlp(), data, CFG, val=iter(data))
    with pytest.raises(ValueError, match="no batches"):
        train_classifier(mlp(), [], CFG)


def test_unlabelled_batches_need_a_loss_that_needs_no_labels() -> None:
    x = load_digits_split("train").images[:64]
    with pytest.raises(ValueError, match="needs labels"):
        train_classifier(mlp(), [((x,), None)], CFG)
    seen: list[Any] = []

    def loss(outputs: torch.Tensor, target: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        seen.append((target, inputs))
        return outputs.pow(2).mean()

    train_classifier(mlp(), [((x,), None)], TrainConfig(epochs=1), loss_fn=loss)
    assert seen[0][0] is None and torch.equal(seen[0][1][0], x)


class ViewAfterConv(nn.Module):
    """Written as much older code is: ``x.view(x.size(0), -1)`` after the convs, which a
    channels_last tensor cannot do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_views_its_activations_trains_in_contiguous_format() -> None:
    """channels_last (the default, faster on CPU) raised "view size is not compatible" on
    the first batch; training falls back to the model's own layout and learns."""
    train, test = load_digits_split("train"), load_digits_split("test")
    model = ViewAfterConv()
    config = TrainConfig(epochs=2, lr=0.05, batch_size=64)
    assert config.channels_last
    train_classifier(model, TensorBatches(train.images, train.labels, 64, shuffle=True), config)
    assert evaluate(model, TensorBatches(test.images, test.labels, 500)) > 80
    assert model.conv.weight.is_contiguous()


class DictOutputs(nn.Module):
    """Returns ``{"logits": ..., "features": ...}``, as Hugging Face style heads do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {"logits": self.head(f), "features": f}


def test_a_model_returning_a_dict_trains_and_is_scored_on_its_first_value() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    model = DictOutputs()
    train_classifier(model, TensorBatches(train.images, train.labels, 64, shuffle=True), CFG)
    assert evaluate(model, TensorBatches(test.images, test.labels, 500)) > 85


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_forward_without_autograd_is_refused_naming_why() -> None:
    from edgeslim.errors import TaskError

    data = [((torch.randn(8, 4),), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(TaskError, match=r"_NoGrad cannot be trained.*torch.no_grad"):
        train_classifier(_NoGrad(), data, TrainConfig(epochs=1, channels_last=False))


def test_evaluate_builds_no_autograd_graph() -> None:
    """Measuring must not record gradients (slower, more memory; and a hook-based
    weight_norm's recomputed weight then could not be deep-copied)."""
    seen: list[bool] = []
    model = nn.Linear(4, 3)
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    evaluate(model, [((torch.randn(5, 4),), torch.zeros(5, dtype=torch.long))])
    assert seen == [False]


class NarrowStridedShortcut(nn.Module):
    """A pruned shortcut: a 1x1 stride-2 conv reading 9 channels (torch 2.13's channels_last
    backward of it aborted the process at batch 13 on 16x16 maps)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 9, 3, padding=1)
        self.shortcut = nn.Conv2d(9, 8, 1, stride=2, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shortcut(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_narrow_strided_1x1_conv_trains_in_contiguous_format() -> None:
    from edgeslim.train.loop import channels_last_hazard

    model = NarrowStridedShortcut()
    assert channels_last_hazard(model) == "shortcut"
    assert channels_last_hazard(ViewAfterConv()) is None
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 3, 16, 16, generator=g), torch.randint(0, 4, (13,), generator=g)
    before = model.shortcut.weight.detach().clone()
    train_classifier(model, [((x,), y)] * 3, TrainConfig(epochs=1, lr=0.05))
    assert not torch.equal(model.shortcut.weight, before)  # it trained, and did not abort


def test_keep_best_keeps_the_untrained_weights_when_training_only_hurts() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    held = TensorBatches(test.images, test.labels, 500)
    model = mlp()
    train_classifier(model, TensorBatches(train.images, train.labels, 64, shuffle=True), CFG)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    top1 = evaluate(model, held)
    wild = TrainConfig(epochs=2, lr=50.0, weight_decay=0.0, channels_last=False)
    hist = train_classifier(
        model, TensorBatches(train.images, train.labels, 64), wild, val=held, keep_best=True
    )
    assert all(h["val_top1"] < top1 for h in hist)  # the wild rate wrecks every epoch
    assert hist[-1]["best_epoch"] == 0 and hist[-1]["val_top1_start"] == top1
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_keep_best_ends_on_the_best_epoch_and_needs_held_out_batches() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    held = TensorBatches(test.images, test.labels, 500)
    model = mlp()
    batches = TensorBatches(train.images, train.labels, 64, shuffle=True)
    hist = train_classifier(model, batches, CFG, val=held, keep_best=True)
    best = max(h["val_top1"] for h in hist)
    assert hist[-1]["best_epoch"] == 1 + [h["val_top1"] for h in hist].index(best)
    assert evaluate(model, held) == best > hist[-1]["val_top1_start"]
    with pytest.raises(ValueError, match="keep_best needs val"):
        train_classifier(mlp(), batches, CFG, keep_best=True)


def test_a_conv3d_model_trains() -> None:
    """A 5-D weight has no channels_last format (``to`` raised on it): such a model trains
    in the contiguous one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(4, 3))  # fmt: skip
    x, y = torch.randn(16, 2, 4, 8, 8), torch.randint(0, 3, (16,))
    hist = train_classifier(model, [(x, y)], TrainConfig(epochs=2, lr=0.05))
    assert len(hist) == 2 and all(p.is_contiguous() for p in model.parameters())


def test_labels_that_do_not_fit_the_output_are_refused_naming_both() -> None:
    """One label per image against a depth map (N, H, W): cross-entropy raised torch's
    'Expected input batch_size (2048) to match target batch_size (32)'."""
    from edgeslim.errors import TaskError
    from edgeslim.train.loop import cross_entropy

    depth = torch.randn(4, 8, 8)
    with pytest.raises(TaskError, match=r"labels \[4\] do not fit the first output \[4, 8, 8\]"):
        cross_entropy(depth, torch.zeros(4, dtype=torch.long))
    assert cross_entropy(depth, torch.zeros(4, 8, dtype=torch.long)).dim() == 0  # per row
