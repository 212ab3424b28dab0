"""The headline a task chooses by itself: outputs shaped as values (an image, a detector's
heads) are measured by cosine, not by an argmax over their channels."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from edgeslim.data.batching import TensorBatches
from edgeslim.task import Task
from edgeslim.task.agreement import values_not_classes


class SuperResolution(nn.Module):
    """ESPCN: convs then a pixel shuffle, an RGB image at twice the size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TwoHeads(nn.Module):
    """A detector's two heads at two resolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head1, self.head2 = nn.Conv2d(8, 18, 1), nn.Conv2d(8, 18, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.stem(x)
        return self.head1(a), self.head2(self.down(a))


def _task(**kw: object) -> Task:
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=8), **kw)  # type: ignore[arg-type]


def test_an_image_output_is_measured_by_cosine_with_a_note() -> None:
    task = _task()
    with pytest.warns(UserWarning, match="shaped like its input"):
        task.bind_reference(SuperResolution().eval())
    assert task.headline == "cosine" and task.value_outputs
    assert "--metric agreement" in task.notes[0]
    metrics = task.measure(SuperResolution().eval())
    assert next(iter(metrics)) == "cosine"
    # cosine is continuous: no 'one held row' step widens what a file may differ by
    assert task.metric_step(metrics) is None


def test_a_detector_s_heads_are_measured_by_cosine() -> None:
    task = _task()
    with pytest.warns(UserWarning, match="several resolutions"):
        task.bind_reference(TwoHeads().eval())
    assert task.headline == "cosine"


@pytest.mark.parametrize(
    ("out_shape", "values"),
    [((1, 10), False), ((1, 21, 16, 16), False), ((1, 3, 16, 16), True), ((1, 3, 32, 32), True),
     ((1, 3, 24, 16), False), ((1, 1, 16, 16), False),
     # one value per pixel (a depth map) at one whole factor of the input; a (N, T, K)
     # sequence read off the image is not, unless K scales W as T scales H
     ((1, 16, 16), True), ((1, 32, 32), True), ((1, 4, 4), True), ((1, 16, 32), False),
     ((1, 16, 37), False)],
)  # fmt: skip
def test_which_shapes_are_values(out_shape: tuple[int, ...], values: bool) -> None:
    x = torch.zeros(1, 3, 16, 16)
    assert (values_not_classes([x], [torch.zeros(out_shape)]) is not None) == values


def test_a_sequence_tagger_keeps_agreement() -> None:
    """``(N, T, F) -> (N, T, K)``: time on axis 1 is not a channel; only the input's own
    shape reads as a signal."""
    x = torch.zeros(1, 20, 40)
    assert values_not_classes([x], [torch.zeros(1, 20, 80)]) is None
    assert values_not_classes([x], [torch.zeros(1, 20, 40)]) is not None


def test_a_chosen_headline_is_kept_and_a_classifier_keeps_agreement() -> None:
    task = _task(primary="agreement")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.bind_reference(SuperResolution().eval())
    assert task.headline == "agreement" and not task.notes
    task = _task()
    with pytest.warns(UserWarning):
        task.bind_reference(SuperResolution().eval())
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(4, 5)).eval()  # fmt: skip
    with torch.no_grad():
        classifier[3].weight.normal_(0, 10.0)  # classes that vary over the held samples
    task.bind_reference(classifier)  # the choice made for the image model is undone
    assert task.headline == "agreement" and not task.notes


def test_a_one_sided_score_warns_that_agreement_means_nothing() -> None:
    """A Siamese model's distance is never below 0: every row is 'above 0', so agreement
    read 100% even for a model pruned at random. The task says so and asks for a metric."""

    class Distance(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).norm(dim=1, keepdim=True) + 2.0

    task = _task()
    with pytest.warns(UserWarning, match="agreement means nothing here"):
        task.bind_reference(Distance().eval())
    assert "Task(evaluate=...)" in task.notes[0]
    logit = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1)).eval()  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        logit[3].bias.fill_(0.0)
    task.bind_reference(logit)  # a binary logit on both sides of 0: agreement is fine
    assert not task.notes


def test_a_reference_with_one_class_on_top_everywhere_warns() -> None:
    """A head whose bias dwarfs its inputs answers one class for every held sample: any
    model that keeps that class on top read 100% agreement, with nothing said."""
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()  # fmt: skip
    with torch.no_grad():
        head[3].bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0, 0.0]))
    task = _task()
    with pytest.warns(UserWarning, match="class 2 on top for every one"):
        task.bind_reference(head)
    assert task.notes[0].startswith("WARNING: metric: agreement says little")
    with torch.no_grad():
        head[3].bias.zero_()
        head[3].weight.normal_(0, 10.0)
    task.bind_reference(head)  # classes vary over the held samples: nothing to say
    assert not task.notes


class Depth(nn.Module):
    """A depth head: one ReLU'd value per pixel at twice the input's size, ``(N, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.PixelShuffle(2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x)[:, 0] - 0.3)  # many rows all 0


def test_a_depth_map_is_measured_by_cosine_and_empty_rows_agree_with_themselves() -> None:
    torch.manual_seed(0)
    model = Depth().eval()
    task = _task()
    with pytest.warns(UserWarning, match="one value per pixel"):
        task.bind_reference(model)
    metrics = task.measure(model)
    assert next(iter(metrics)) == "cosine" and metrics["cosine"] == pytest.approx(1.0)
