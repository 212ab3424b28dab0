"""Binary classifiers (one score per sample): agreement, top-1, training and KD read a
decision, not an argmax over one value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.task.agreement import AgreementReference, agreement_metrics, model_outputs


class Score(nn.Module):
    """One score per sample: a logit (``(N, 1)`` or squeezed ``(N,)``) or its sigmoid."""

    def __init__(self, shift: float = 0.0, squeeze: bool = False, prob: bool = False) -> None:
        super().__init__()
        self.shift, self.squeeze, self.prob = shift, squeeze, prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :1] + self.shift
        s = s.sigmoid() if self.prob else s
        return s[:, 0] if self.squeeze else s


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("prob", [False, True])
def test_one_score_per_sample_counts_equal_decisions(squeeze: bool, prob: bool) -> None:
    x = torch.linspace(-1, 1, 21)[:, None].repeat(1, 3)  # scores -1 .. 1, step 0.1
    batches = [(x[:8],), (x[8:16],), (x[16:],)]  # uneven batches: rows, not one per batch
    ref = AgreementReference.of(Score(squeeze=squeeze, prob=prob), batches)
    same = agreement_metrics(ref, model_outputs(Score(squeeze=squeeze, prob=prob), batches))
    assert same["agreement"] == 100.0
    # shifting the score by 0.25 flips the decisions of -0.2, -0.1 (0 is not > 0 before
    # and after: 0.25 > 0 flips it too): 3 of 21 rows
    moved = Score(0.25, squeeze=squeeze, prob=prob)
    got = agreement_metrics(ref, model_outputs(moved, batches))
    assert got["agreement"] == pytest.approx(100.0 * 18 / 21)


def test_confidence_of_a_binary_decision_is_its_probability() -> None:
    x = torch.linspace(-4, 4, 9)[:, None]
    ref = AgreementReference.of(Score(), [(x,)])
    got = agreement_metrics(ref, model_outputs(Score(0.5), [(x,)]), min_confidence=0.8)
    # sigmoid(|s|) >= 0.8 for |s| >= 1.39: 6 of 9 rows are sure, and none of them flips
    assert got["confident_rows"] == 6.0 and got["agreement"] == 100.0
    assert got["agreement_all"] == pytest.approx(100.0 * 8 / 9)  # s = -0 ... only 0 flips


@pytest.mark.parametrize("prob", [False, True])
def test_labelled_top1_of_a_binary_classifier_reads_its_decisions(prob: bool) -> None:
    """The argmax over one score is always class 0: top-1 read the share of label 0."""
    from edgeslim.train.loop import evaluate

    x = torch.linspace(-1, 1, 20)[:, None]
    labels = (x[:, 0] > 0).long()
    labels[:3] = 1  # three wrong for a model deciding by the sign
    model = Score(prob=prob)
    assert evaluate(model, [((x,), labels)]) == pytest.approx(100.0 * 17 / 20)
    squeezed = Score(squeeze=True, prob=prob)
    assert evaluate(squeezed, [((x,), labels)]) == pytest.approx(100.0 * 17 / 20)


@pytest.mark.parametrize("prob", [False, True])
def test_a_binary_classifier_trains_with_the_default_loss(prob: bool) -> None:
    """Cross-entropy over one class raised 'target 1 is out of bounds'; one score per
    sample trains by binary cross-entropy (on logits, or on a final sigmoid's output)."""
    from edgeslim.data import TensorBatches
    from edgeslim.train.loop import TrainConfig, evaluate, train_classifier

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(2, 1)] + ([nn.Sigmoid()] if prob else [])
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))  # starts wrong on about half
    data = TensorBatches(x, y, batch_size=32, shuffle=True)
    before = evaluate(model, data)
    cfg = TrainConfig(epochs=5, lr=0.1, weight_decay=0.0, channels_last=False)
    train_classifier(model, data, cfg)
    assert evaluate(model, data) > max(before, 90.0)


@pytest.mark.parametrize("prob", [False, True])
def test_distilling_a_binary_classifier_has_a_signal(prob: bool) -> None:
    """A softmax over one score is 1: the KD divergence was 0 whatever the student said."""
    from edgeslim.distill.kd import soft_kl

    teacher = torch.tensor([[2.0], [-1.0], [0.5]])
    if prob:
        teacher = teacher.sigmoid()
    same = soft_kl(teacher.clone(), teacher, 4.0)
    other = soft_kl(1 - teacher if prob else -teacher, teacher, 4.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(other) > 0.01
    # the squeezed form (N,) reads the same
    assert float(soft_kl(teacher[:, 0], teacher[:, 0], 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_a_segmentation_map_has_its_classes_on_axis_1() -> None:
    """``(N, C, H, W)`` outputs: agreement, top-1 and the loss read classes per pixel, not
    an argmax along the image's width."""
    from edgeslim.train.loop import cross_entropy, evaluate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g)
    labels = x.argmax(1)  # (N, H, W): the identity "model" is right on every pixel
    assert evaluate(nn.Identity(), [((x,), labels)]) == 100.0
    wrong = labels.clone()
    wrong[0, 0, :] = (wrong[0, 0, :] + 1) % 3  # 7 of 70 pixels
    assert evaluate(nn.Identity(), [((x,), wrong)]) == pytest.approx(90.0)
    loss = cross_entropy(x, labels)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(x, labels))
    ref = AgreementReference.of(nn.Identity(), [(x,)])
    flipped = x.clone()
    flipped[0, :, 0, :] = flipped[0, :, 0, :].flip(0) * -1  # changes some pixels' argmax
    hits = (flipped.argmax(1) == x.argmax(1)).float().mean()
    got = agreement_metrics(ref, model_outputs(nn.Identity(), [(flipped,)]))
    assert got["agreement"] == pytest.approx(100.0 * float(hits))


def test_a_binary_segmentation_map_is_one_score_per_pixel() -> None:
    """``(N, 1, H, W)``: top-1 and the default loss read one decision per pixel (the loss
    took cross-entropy over one class and raised 'target 1 is out of bounds')."""
    from edgeslim.train.loop import cross_entropy, evaluate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 5, generator=g)
    labels = (x[:, 0] > 0).long()  # (N, H, W)
    assert evaluate(nn.Identity(), [((x,), labels)]) == 100.0
    loss = cross_entropy(x, labels)
    want = nn.functional.binary_cross_entropy_with_logits(x[:, 0], labels.float())
    torch.testing.assert_close(loss, want)
