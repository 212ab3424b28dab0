"""Distillation losses on the shipped resnet20 (teacher) and its pruned student, with
Fashion-MNIST images.

The teacher runs once per batch whatever the terms; each loss falls when the student trains
on it through ``train_classifier`` (measured on training images: the student is already
distilled, so 16 steps on 256 images overfit and held-out KD rises a little, which is not
what is tested here) and its gradient reaches the student and the learned adapters;
adapters exist exactly where channel counts differ; an unknown tap names its closest FQNs;
stale features, a missing student or missing example inputs are refused.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.distill import (
    AttentionConfig,
    DCCDConfig,
    DistillConfigError,
    DistillLoss,
    FeatureConfig,
    KDConfig,
    StudentWithAdapters,
    TapError,
    UnknownTapError,
)
from edgeslim.train.loop import TrainConfig, train_classifier
from edgeslim.zoo import resolve_model

# layer1.0.conv1: 8 channels in the student, 16 in the teacher; layer2: 32 in both;
# layer3.2.bn1: 32 vs 64
FEATURE_TAPS = ("layer1.0.conv1", "layer2", "layer3.2.bn1")

CASES: dict[str, tuple[Any, ...]] = {
    "kd": (KDConfig(),),
    "feature": (FeatureConfig(taps=FEATURE_TAPS),),
    "attention": (AttentionConfig(taps=("layer1", "layer2", "layer3")),),
    "dccd": (KDConfig(), DCCDConfig(taps=("layer2", "layer3.2.bn1"))),
}
PART = {"kd": "kd", "feature": "feature", "attention": "attention", "dccd": "dccd_contrast"}


class Counted(nn.Module):
    """A teacher that counts the forwards of every copy of it."""

    calls = 0

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        out: torch.Tensor = self.inner(x)
        return out


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return resolve_model("resnet20").eval()


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    return resolve_model("resnet20-pruned50").eval()


@pytest.fixture(scope="module")
def train_split():  # type: ignore[no-untyped-def]
    return load_fashion_mnist("train", limit=256)


def unlabelled(split) -> TensorBatches:  # type: ignore[no-untyped-def]
    """Training batches without labels: the loss is then the distillation alone."""
    return TensorBatches(split.images, None, 32, shuffle=True, pairs=True)


@pytest.fixture(scope="module")
def held(fmnist_test_small) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return fmnist_test_small.images[:64]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _parts(loss: DistillLoss, student: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The loss parts on ``x`` without labels, as training sees them (BatchNorm on batch
    statistics, so what the running statistics did between two calls does not count)."""
    student.train()
    with torch.no_grad():
        loss(student(x), None, (x,))
    return dict(loss.last)


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_runs_once_per_batch(
    case: str, teacher: nn.Module, pruned: nn.Module, held: torch.Tensor
) -> None:
    configs = tuple(
        type(c)(**{**c.__dict__, "taps": tuple((s, f"inner.{s}") for s in c.taps)})
        if hasattr(c, "taps")
        else c
        for c in CASES[case]
    )  # the wrapper's FQNs gain "inner.": taps given as (student, teacher) pairs
    student = copy.deepcopy(pruned).train()
    loss = DistillLoss(Counted(teacher), student, configs, (held[:1],))
    x, y = held[:16], torch.zeros(16, dtype=torch.long)
    for _ in range(3):
        before = Counted.calls
        loss(student(x), y, (x,)).backward()
        assert Counted.calls == before + 1
    loss.close()


@pytest.mark.parametrize("case", list(CASES))
def test_each_loss_falls_and_trains_student_and_adapters(
    case: str, teacher: nn.Module, pruned: nn.Module, train_split, held: torch.Tensor
) -> None:  # type: ignore[no-untyped-def]
    student = copy.deepcopy(pruned)
    with DistillLoss(teacher, student, CASES[case], (held[:1],)) as loss:
        # one unlabelled backward: the distillation part alone reaches the first conv and
        # every adapter/projection
        student.train()
        x = held[:32]
        loss(student(x), None, (x,)).backward()
        assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
        learned = list(loss.named_parameters())
        assert (len(learned) > 0) == (case in ("feature", "dccd"))
        for name, p in learned:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        student.zero_grad()
        loss.zero_grad()

        part = PART[case]
        seen = train_split.images[:64]
        start = _parts(loss, student, seen)[part]
        wrapped = loss.trainable_student()
        ids = {id(p) for p in wrapped.parameters()}
        assert all(id(p) in ids for _, p in learned)
        learned_before = [p.detach().clone() for _, p in learned]
        train_classifier(
            wrapped, unlabelled(train_split), TrainConfig(epochs=2, lr=0.01), loss_fn=loss
        )
        end = _parts(loss, student, seen)[part]
        assert end < start, (part, start, end)
        for before, (name, p) in zip(learned_before, learned, strict=True):
            assert not torch.equal(before, p), f"{name} did not train"


def test_dccd_difference_falls(teacher: nn.Module, pruned: nn.Module, train_split, held) -> None:  # type: ignore[no-untyped-def]
    """Measured with a fresh loss each time, so the second views are the same ones."""
    student = copy.deepcopy(pruned)
    measure = DCCDConfig(taps=("layer3",), contrast_weight=0.0)

    def difference() -> float:
        with DistillLoss(teacher, student, [measure], (held[:1],)) as probe:
            return _parts(probe, student, train_split.images[:64])["dccd_difference"]

    start = difference()
    with DistillLoss(teacher, student, [DCCDConfig(taps=("layer3",))], (held[:1],)) as loss:
        train_classifier(
            loss.trainable_student(), unlabelled(train_split), TrainConfig(epochs=2, lr=0.01),
            loss_fn=loss,
        )  # fmt: skip
    assert difference() < start


def test_adapters_exactly_where_channels_differ(
    teacher: nn.Module, pruned: nn.Module, held: torch.Tensor
) -> None:
    student = copy.deepcopy(pruned)
    loss = DistillLoss(teacher, student, [FeatureConfig(taps=FEATURE_TAPS)], (held[:1],))
    adapters = dict(loss.named_parameters())
    assert adapters["terms.0.adapters.0.map.weight"].shape == (16, 8, 1, 1)
    assert adapters["terms.0.adapters.2.map.weight"].shape == (64, 32, 1, 1)
    assert len(adapters) == 2  # layer2 has 32 channels in both
    loss.close()
    same = DistillLoss(
        teacher, student, [FeatureConfig(taps=("layer2",), adapter="always")], (held[:1],)
    )
    (w,) = same.parameters()
    assert torch.equal(w.reshape(32, 32), torch.eye(32))  # identity at the start
    wrapped = same.trainable_student()
    assert isinstance(wrapped, StudentWithAdapters)
    student.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(held[:4]), student(held[:4]))
    same.close()


def test_unknown_taps_name_the_closest_modules(teacher: nn.Module, pruned: nn.Module, held) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownTapError, match=r"student tap 'layer1.0.conv3'.*layer1.0.conv1"):
        DistillLoss(teacher, pruned, [FeatureConfig(taps=("layer1.0.conv3",))], (held[:1],))
    with pytest.raises(UnknownTapError, match=r"teacher tap 'layr2'.*close matches: layer2"):
        DistillLoss(teacher, pruned, [AttentionConfig(taps=(("layer2", "layr2"),))])
    assert _hooks(pruned) == 0  # nothing left behind by the failed constructions


def test_refusals(teacher: nn.Module, pruned: nn.Module, held: torch.Tensor) -> None:
    student = copy.deepcopy(pruned).train()
    with pytest.raises(DistillConfigError, match="pass the student"):
        DistillLoss(teacher, None, [AttentionConfig(taps=("layer1",))])
    with pytest.raises(DistillConfigError, match="example_inputs"):
        DistillLoss(teacher, student, [FeatureConfig(taps=("layer1",))])
    with pytest.raises(DistillConfigError, match="one config per kind"):
        DistillLoss(teacher, student, [KDConfig(), KDConfig(alpha=0.1)])
    with pytest.raises(DistillConfigError, match="same resolution"):
        DistillLoss(teacher, student, [FeatureConfig(taps=(("layer1", "layer2"),))], (held[:1],))
    loss = DistillLoss(teacher, student, [AttentionConfig(taps=("layer1",))])
    x = held[:8]
    loss(student(x), None, (x,))
    with pytest.raises(TapError, match="captured nothing"):  # no student forward since
        loss(torch.zeros(8, 10), None, (x,))
    assert _hooks(student) == 1
    loss.close()
    assert _hooks(student) == 0


def test_teacher_is_a_frozen_copy(teacher: nn.Module, pruned: nn.Module, held) -> None:  # type: ignore[no-untyped-def]
    original = copy.deepcopy(teacher).train()
    loss = DistillLoss(
        original, copy.deepcopy(pruned), [FeatureConfig(taps=("layer2",))], (held[:1],)
    )
    assert loss.teacher is not original and not loss.teacher.training
    assert original.training and _hooks(original) == 0
    assert all(not p.requires_grad for p in loss.teacher.parameters())
    assert all(p.requires_grad for p in original.parameters())
    loss.close()


@pytest.mark.parametrize("first", ["edgeslim.distill", "edgeslim.train"])
def test_either_package_imports_first(first: str) -> None:
    """edgeslim.train re-exports kd_loss from edgeslim.distill, which uses the training
    loop: both import orders must work in a fresh interpreter."""
    code = (
        f"import {first}; from edgeslim.train.distill import kd_loss; "
        "from edgeslim.distill import kd_loss as k2; assert kd_loss is k2"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
