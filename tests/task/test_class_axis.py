"""Which axis of the first output agreement reads as classes: a conv's per-frame scores
``(N, C, T)`` (WaveNet, a CTC speech model) hold them on axis 1, a linear's ``(N, T, C)``
last."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.data.batching import TensorBatches
from edgeslim.task import Task


class FrameClassifier(nn.Module):
    """Conv1d layers then per-frame log-probabilities over 6 classes on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(16, 6, 1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.body(x), dim=1)


class ClassOffset(nn.Module):
    """The reference plus a constant per class: every frame's argmax over the classes can
    move, while each class's argmax over time stays where it was."""

    def __init__(self, model: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.model, self.offset = model, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.offset[:, None]


class Tagger(nn.Module):
    """A linear over the features: ``(N, T, F) -> (N, T, 5)``, classes last."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _task(shape: tuple[int, ...], **kw: object) -> Task:
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    return Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=8), **kw)  # type: ignore[arg-type]


def test_a_conv_s_frame_scores_are_read_per_frame() -> None:
    model = FrameClassifier().eval()
    task = _task((4, 20))
    task.bind_reference(model)
    assert task.chosen_class_axis == 1 and "axis 1" in task.notes[0] and "`body.2`" in task.notes[0]
    assert task.value_outputs  # the KD softmax reads the last axis: distil as values
    assert task.metric_step(task.measure(model)) == 100.0 / (16 * 20)  # one frame
    offset = torch.tensor([0.0, 3.0, 0.0, -3.0, 0.0, 0.0])
    moved = task.measure(ClassOffset(model, offset).eval())
    assert moved["agreement"] < 90.0  # frames now decided for class 1
    # read along time instead, the same model would agree everywhere
    task = _task((4, 20), class_axis=-1)
    task.bind_reference(model)
    assert task.chosen_class_axis == -1 and not task.notes and not task.value_outputs
    assert task.measure(ClassOffset(model, offset).eval())["agreement"] == 100.0


def test_a_linear_s_sequence_keeps_the_last_axis() -> None:
    task = _task((20, 4))
    task.bind_reference(Tagger().eval())
    assert task.chosen_class_axis is None and not task.notes and not task.value_outputs


def test_a_class_axis_the_output_lacks_is_refused() -> None:
    import pytest

    from edgeslim.errors import TaskError

    task = _task((4, 20), class_axis=3)
    with pytest.raises(TaskError, match=r"class_axis 3 does not exist.*\[1, 6, 20\]"):
        task.bind_reference(FrameClassifier().eval())


class TwoHeads(nn.Module):
    """Per-frame scores, then an utterance class from a linear that runs after them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frames = nn.Conv1d(4, 6, 3, padding=1)
        self.utterance = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frames(x), self.utterance(x.mean(2))


class Transposed(nn.Module):
    """A conv's scores moved to ``(N, T, C)`` by a view, with as many frames as classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 20, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).transpose(1, 2)


def test_a_head_computed_after_the_frames_does_not_hide_them() -> None:
    task = _task((4, 20))
    task.bind_reference(TwoHeads().eval())
    assert task.chosen_class_axis == 1 and "`frames`" in task.notes[0]


def test_a_view_moving_the_channels_last_keeps_the_last_axis_even_when_c_equals_t() -> None:
    task = _task((4, 20))
    task.bind_reference(Transposed().eval())
    assert task.chosen_class_axis is None and not task.value_outputs


def test_a_labelled_task_finds_the_axis_too() -> None:
    """With a metric function (labels), agreement is not measured, but fine-tuning still
    needs to know the classes are off the last axis (its KD softmax reads the last)."""
    task = _task((4, 20), evaluate=lambda m: 1.0)
    task.bind_reference(FrameClassifier().eval())
    assert task.chosen_class_axis == 1 and task.value_outputs


def test_class_axis_on_the_last_axis_is_not_off_it() -> None:
    task = _task((20, 4), class_axis=2)  # (N, T, C): 2 is the last axis
    task.bind_reference(Tagger().eval())
    assert task.chosen_class_axis == 2 and not task.value_outputs
