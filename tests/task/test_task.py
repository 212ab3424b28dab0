"""Tasks: agreement metrics, ``Task`` validation, ``.npz`` / image-folder / function sources and
the command line's ``--data`` / ``--metric`` / ``--input-shape`` resolution."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.data.batching import TensorBatches
from edgeslim.errors import TaskError
from edgeslim.task import (
    Task,
    agreement_metrics,
    flat_outputs,
    image_folder_task,
    normalised_range,
    npz_task,
    resolve_task,
)
from edgeslim.task.agreement import AgreementReference
from edgeslim.task.resolve import check_shapes

# ---- agreement metrics ---------------------------------------------------------------------


def _ref(*outputs: torch.Tensor) -> AgreementReference:
    return AgreementReference(batches=[], outputs=list(outputs))


def _logits(rows: int = 4, classes: int = 10) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(0))


def test_identical_outputs_agree_fully() -> None:
    ref = _logits()
    m = agreement_metrics(_ref(ref), [ref.clone()])
    assert m["agreement"] == 100.0 and m["top5_agreement"] == 100.0
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "agreement_all" not in m and "confident_rows" not in m


def test_one_flipped_row_of_four_is_75_percent() -> None:
    ref = _logits()
    out = ref.clone()
    out[2, ref[2].argmax()] = ref[2].min() - 1.0  # the reference's top-1 drops to last place
    m = agreement_metrics(_ref(ref), [out])
    assert m["agreement"] == 75.0 and m["top5_agreement"] == 75.0
    assert m["cosine"] < 1.0


def test_top5_agreement_only_with_ten_classes_or_more() -> None:
    ref = _logits(classes=9)
    assert "top5_agreement" not in agreement_metrics(_ref(ref), [ref])


def test_cosine_is_averaged_over_every_output() -> None:
    logits, values = _logits(), torch.randn(4, 3)
    m = agreement_metrics(_ref(logits, values), [logits, -values])
    assert m["agreement"] == 100.0  # argmax: the first output only
    assert m["cosine"] == pytest.approx(0.0, abs=1e-6)  # (1 + -1) / 2


def test_outputs_not_matching_the_reference_are_an_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        agreement_metrics(_ref(_logits()), [_logits(rows=3)])
    with pytest.raises(ValueError, match="do not match"):
        agreement_metrics(_ref(_logits()), [_logits(), _logits()])


def test_min_confidence_counts_only_rows_the_reference_is_sure_of() -> None:
    ref = torch.zeros(4, 10)
    ref[0, 1] = ref[1, 2] = 10.0  # sure (softmax top-1 ~ 1)
    ref[2, 3] = ref[3, 4] = 0.1  # unsure (softmax top-1 ~ 0.11)
    out = ref.clone()
    out[2, 5] = 1.0  # an unsure row flips
    m = agreement_metrics(_ref(ref), [out], min_confidence=0.5)
    assert m["agreement"] == 100.0 and m["agreement_all"] == 75.0
    assert m["confident_rows"] == 2.0
    out[1, 6] = 20.0  # and a sure one
    m = agreement_metrics(_ref(ref), [out], min_confidence=0.5)
    assert m["agreement"] == 50.0 and m["agreement_all"] == 50.0


def test_min_confidence_with_no_sure_row_gives_zero() -> None:
    ref = torch.zeros(3, 10)
    m = agreement_metrics(_ref(ref), [ref], min_confidence=0.9)
    assert m["agreement"] == 0.0 and m["agreement_all"] == 100.0 and m["confident_rows"] == 0.0


def test_flat_outputs_walks_tuples_and_dicts_in_order() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert flat_outputs({"x": a, "y": (b, [c]), "n": None}) == [a, b, c]


# ---- Task ----------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    """``x`` (batch, 4) and a state ``h`` (2, batch, 3) -> (batch, 5) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(3, 5)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(h.sum(0))


def test_task_rejects_a_generator_as_train() -> None:
    x = torch.randn(8, 4)
    with pytest.raises(TaskError, match="generator"):
        Task(example_inputs=(x[:1],), train=((x, None) for _ in range(2)))
    Task(example_inputs=(x[:1],), train=[(x, None)])  # a list is re-iterable
    for what in ("calibration", "validation"):  # read several times too
        with pytest.raises(TaskError, match=f"{what} is a one-shot"):
            Task(example_inputs=(x[:1],), **{what: (x for _ in range(2))})


def test_train_batches_without_targets_are_refused_naming_pairs() -> None:
    """TensorBatches(x, None) yields input tuples: with two inputs the second was read as
    the target; with one, training failed on 'a pair' with no word on TensorBatches."""
    x0, x1 = torch.randn(8, 3), torch.randn(8, 5)
    with pytest.raises(TaskError, match=r"without targets.*pairs=True"):
        Task(example_inputs=(x0[:1], x1[:1]), train=TensorBatches((x0, x1), None))
    task = Task(example_inputs=(x0[:1],), train=TensorBatches(x0, None, pairs=True))
    inputs, target = next(iter(task.train))  # type: ignore[arg-type]
    assert target is None and inputs[0].shape == (8, 3)


def test_dict_batches_are_refused_with_the_wrapper_that_reads_them() -> None:
    """A Hugging Face style loader yields dicts: the error names the keys and the fix
    (MappedBatches), which then serves inputs and training pairs, re-iterably."""
    from torch.utils.data import DataLoader

    from edgeslim.data import MappedBatches
    from edgeslim.data.batching import as_batch

    rows = [{"pixel_values": torch.randn(4), "labels": i % 2} for i in range(10)]
    loader = DataLoader(rows, batch_size=4)  # default collate: a dict of stacked tensors
    x = torch.randn(1, 4)
    with pytest.raises(
        TaskError, match=r"calibration: .*keys \['pixel_values', 'labels'\].*MappedBatches"
    ):
        Task(example_inputs=(x,), calibration=loader).calibration_batches()
    # the hint names the inputs' key, and the pair that keeps the labels for top-1
    with pytest.raises(TaskError, match=r"lambda b: \(b\['pixel_values'\], b\['labels'\]\)"):
        Task(example_inputs=(x,), validation=DataLoader(
            [{"labels": i % 2, "pixel_values": torch.randn(4)} for i in range(4)], batch_size=2,
        )).bind_reference(nn.Linear(4, 2))  # fmt: skip
    with pytest.raises(TypeError, match="MappedBatches"):
        as_batch(next(iter(loader)))
    # the data's fault, not the model's: a stage that trains on it reports it as such
    with pytest.raises(TaskError, match="MappedBatches"):
        as_batch(next(iter(loader)))
    inputs = MappedBatches(loader, lambda b: b["pixel_values"])
    pairs = MappedBatches(loader, lambda b: (b["pixel_values"], b["labels"]))
    task = Task(example_inputs=(x,), calibration=inputs, train=pairs)
    assert sum(int(b[0].shape[0]) for b in task.calibration_batches()) == 10
    for _ in range(2):  # every epoch reads it again
        assert [int(i[0].shape[0]) for i, _y in map(as_batch, task.train_batches())] == [4, 4, 2]
    with pytest.raises(TaskError, match="one-shot"):
        Task(example_inputs=(x,), calibration=MappedBatches(iter(rows), lambda b: b))


def test_a_model_with_weights_other_than_float32_is_refused_naming_the_fix() -> None:
    task = Task(example_inputs=(torch.randn(1, 4),))
    for dtype in (torch.float64, torch.float16):
        model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
        with pytest.raises(
            TaskError, match=rf"weights are {dtype} \(first: 0.weight\).*model.float\(\)"
        ):
            task.check(model)
    task.check(nn.Sequential(nn.Linear(4, 3)))


def test_a_batchnorm_without_running_statistics_is_refused_naming_it() -> None:
    task = Task(example_inputs=(torch.randn(1, 2, 4, 4),))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TaskError, match=r"BatchNorm `1` keeps no running statistics"):
        task.check(model.eval())
    task.check(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, affine=False)).eval())


def test_data_of_another_shape_than_the_example_is_refused_naming_both() -> None:
    """Only the batch dimension may differ (the export fixes the others); caught when the
    data is read, not inside ONNX Runtime."""
    x, h = torch.randn(1, 4), torch.randn(2, 1, 3)
    ok = Task(example_inputs=(x, h), batch_dims=(0, 1), calibration=[(torch.randn(5, 4),
              torch.randn(2, 5, 3))])  # fmt: skip
    assert len(ok.calibration_batches()) == 1
    wrong = Task(example_inputs=(x, h), batch_dims=(0, 1), validation=[(torch.randn(5, 4),
                 torch.randn(3, 5, 3))])  # fmt: skip
    with pytest.raises(TaskError, match=r"validation batch 0, input 1 has shape \[3, 5, 3\]"):
        wrong.validation_batches()
    one = Task(example_inputs=(x, h), batch_dims=(0, 1), calibration=[torch.randn(5, 4)])
    with pytest.raises(TaskError, match="holds 1 input"):
        one.calibration_batches()


def test_task_batch_dims_are_validated() -> None:
    x, h = torch.randn(1, 4), torch.randn(2, 1, 3)
    with pytest.raises(TaskError, match=r"2 example input.*1 batch dimension"):
        Task(example_inputs=(x, h), batch_dims=(0,))
    with pytest.raises(TaskError, match="batch dimension 3 does not exist"):
        Task(example_inputs=(x, h), batch_dims=(0, 3))
    task = Task(example_inputs=(x, h), batch_dims=(0, 1))
    assert task.dims == (0, 1) and task.names == ["input", "input1"]
    assert [tuple(t.shape) for t in task.inputs_at(3)] == [(3, 4), (2, 3, 3)]


def test_task_input_ranges_are_validated_and_normalised_pixels_give_theirs() -> None:
    x, h = torch.randn(1, 4), torch.randn(2, 1, 3)
    with pytest.raises(TaskError, match=r"2 example input.*1 input range"):
        Task(example_inputs=(x, h), input_ranges=((0.0, 1.0),))
    with pytest.raises(TaskError, match="input range 1 is"):
        Task(example_inputs=(x, h), input_ranges=(None, (2.0, 2.0)))
    task = Task(example_inputs=(x, h), input_ranges=(None, (-1, 3)))
    assert task.input_range(0) is None and task.input_range(1) == (-1.0, 3.0)
    assert Task(example_inputs=(x,)).input_range(0) is None
    # pixels in [0, 1] normalised per channel: the widest ends over the channels
    lo, hi = normalised_range((0.5, 0.25), (0.5, 0.25))
    assert (lo, hi) == pytest.approx((-1.0, 3.0))
    assert normalised_range(0.0, 2.0, 0.0, 255.0) == pytest.approx((0.0, 127.5))
    with pytest.raises(TaskError, match="pair up"):
        normalised_range((0.5, 0.5), (0.5,))


def test_task_without_metric_measures_agreement_with_the_bound_model() -> None:
    torch.manual_seed(0)
    x, h = torch.randn(16, 4), torch.randn(2, 16, 3)
    task = Task(
        example_inputs=(x[:1], h[:, :1]),
        batch_dims=(0, 1),
        calibration=TensorBatches((x, h), batch_size=5, batch_dims=(0, 1)),
    )
    model = TwoInputs().eval()
    with pytest.raises(TaskError, match="bind_reference"):
        task.measure(model)
    task.bind_reference(model)
    assert task.headline == "agreement"
    m = task.measure(model)
    assert next(iter(m)) == "agreement" and m["agreement"] == 100.0
    with torch.no_grad():
        model.a.bias.add_(100.0 * torch.arange(5.0))  # now always class 4
    assert task.measure(model)["cosine"] < 0.99


def test_a_dataloader_of_x_y_pairs_serves_inputs_and_its_labels_give_val_top1() -> None:
    """The most common data a user holds, a DataLoader over TensorDataset(x, y), was read
    as two inputs ('batch 0 holds 2 input(s), the example 1'); its labels were ignored where
    the search scored top-1 on them."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(40, 6)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % 3  # 10 of 40 wrong: 75% top-1, 100% agreement
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    task = Task(example_inputs=(x[:1],), calibration=loader, validation=loader)
    assert sum(b[0].shape[0] for b in task.calibration_batches()) == 40
    task.bind_reference(model)
    assert task.headline == "val_top1"
    m = task.measure(model)
    assert list(m)[:2] == ["val_top1", "agreement"]
    assert m["val_top1"] == pytest.approx(75.0) and m["agreement"] == 100.0
    assert task.metric_step(m) == pytest.approx(100.0 / 40)
    assert any("top-1 on 40 labelled" in n for n in task.notes)
    unlabelled = Task(example_inputs=(x[:1],), validation=DataLoader(TensorDataset(x), 16))
    unlabelled.bind_reference(model)
    assert unlabelled.headline == "agreement" and "val_top1" not in unlabelled.measure(model)
    wrong = Task(example_inputs=(x[:1],),
                 validation=DataLoader(TensorDataset(x, y[:, None].repeat(1, 2)), 16))  # fmt: skip
    with pytest.raises(TaskError, match="validation labels"):
        wrong.bind_reference(model)


def test_a_two_input_dataloader_of_x0_x1_y_calibrates_and_trains() -> None:
    """TensorDataset(x0, x1, y) is how a two-input model's data comes: its batches read as
    three inputs for calibration and were refused by training ('must be a pair')."""
    from torch.utils.data import DataLoader, TensorDataset

    from edgeslim.train.loop import TrainConfig, train_classifier

    torch.manual_seed(0)
    x0, x1 = torch.randn(48, 4), torch.randn(48, 3)
    y = (x0[:, 0] + x1[:, 0] > 0).long() * 4  # classes 0 and 4 of 5
    loader = DataLoader(TensorDataset(x0, x1, y), batch_size=16)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(3, 5)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.a(u) + self.b(v)

    task = Task(example_inputs=(x0[:1], x1[:1]), calibration=loader, train=loader,
                validation=loader)  # fmt: skip
    assert [len(b) for b in task.calibration_batches()] == [2, 2, 2]
    model = Two()
    history = train_classifier(model, task.train_batches(), TrainConfig(epochs=3, lr=0.1))
    assert history[-1]["loss"] < history[0]["loss"]
    task.bind_reference(model.eval())
    assert task.headline == "val_top1" and task.measure(model)["val_top1"] > 60


def test_metric_step_is_one_held_row_of_the_tasks_own_agreement() -> None:
    """What one flipped row moves agreement by: the export's runtime check allows a few."""
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    task.bind_reference(model)
    assert task.metric_step(task.measure(model)) == pytest.approx(100.0 / 40)
    sure = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16),
                min_confidence=0.5)  # fmt: skip
    sure.bind_reference(model)
    m = sure.measure(model)
    assert 0 < m["confident_rows"] < 40
    assert sure.metric_step(m) == pytest.approx(100.0 / m["confident_rows"])
    scored = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16),
                  evaluate=lambda _m: 0.5)  # fmt: skip
    assert scored.metric_step(scored.measure(model)) is None


def test_metric_step_of_a_labelled_npz_is_one_held_sample(tmp_path: Path) -> None:
    """A labelled ``.npz`` measures top-1 on its held samples: one of them is its step."""
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 5)
    task = npz_task(tmp_path / "d.npz")
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    metrics = task.measure(model)
    assert task.headline == "top1" and task.metric_rows is not None
    assert 0 < task.metric_rows < 50
    assert task.metric_step(metrics) == pytest.approx(100.0 / task.metric_rows)


def test_task_calibration_batches_cut_at_the_limit_along_batch_dims() -> None:
    x, h = torch.randn(10, 4), torch.randn(2, 10, 3)
    task = Task(
        example_inputs=(x[:1], h[:, :1]),
        batch_dims=(0, 1),
        calibration=TensorBatches((x, h), batch_size=4, batch_dims=(0, 1)),
    )
    batches = task.calibration_batches(6)
    assert [(tuple(a.shape), tuple(b.shape)) for a, b in batches] == [
        ((4, 4), (2, 4, 3)),
        ((2, 4), (2, 2, 3)),
    ]
    assert torch.equal(torch.cat([b for _, b in batches], dim=1), h[:, :6])


def test_task_metric_errors_are_task_errors() -> None:
    x = torch.randn(4, 4)

    def bad(model: nn.Module) -> float:
        raise RuntimeError("boom")

    task = Task(example_inputs=(x[:1],), evaluate=bad, metric="m")
    with pytest.raises(TaskError, match="raised RuntimeError: boom"):
        task.measure(nn.Linear(4, 2))

    def wordy(model: nn.Module) -> Any:
        return "high"

    task = Task(example_inputs=(x[:1],), evaluate=wordy, metric="m")
    with pytest.raises(TaskError, match="returned str"):
        task.measure(nn.Linear(4, 2))
    # a NaN passes every limit it is compared with (all comparisons are false): refused
    for value in (float("nan"), {"top1": 90.0, "loss": float("inf")}):
        task = Task(example_inputs=(x[:1],), evaluate=lambda _m, v=value: v, metric="m")
        with pytest.raises(TaskError, match="finite number"):
            task.measure(nn.Linear(4, 2))


def test_task_check_names_the_shapes_when_inputs_do_not_fit() -> None:
    task = Task(example_inputs=(torch.randn(1, 7),))
    with pytest.raises(TaskError, match=r"\[1, 7\].*--input-shape"):
        task.check(nn.Linear(4, 2))
    ints = Task(example_inputs=(torch.zeros(1, 4, dtype=torch.int64),))  # an int .npz array
    with pytest.raises(TaskError, match=r"\[1, 4\] torch.int64.*dtype is kept"):
        ints.check(nn.Linear(4, 2))


# ---- .npz ----------------------------------------------------------------------------------


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_with_several_inputs_and_batch_dims(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((10, 4)).astype(np.float32)
    x1 = rng.standard_normal((2, 10, 3)).astype(np.float32)
    task = npz_task(_save(tmp_path / "state.npz", x0=x0, x1=x1, batch_dims=np.array([0, 1])))
    assert task.dims == (0, 1) and task.name == "state"
    assert [tuple(t.shape) for t in task.example_inputs] == [(1, 4), (2, 1, 3)]
    assert task.evaluate is None and task.headline == "agreement"
    # the last 20% (2 of 10) are held for the metric, the rest calibrate
    held = task.validation_batches()
    assert torch.equal(torch.cat([a for a, _ in held]), torch.from_numpy(x0[8:]))
    assert torch.equal(torch.cat([b for _, b in held], dim=1), torch.from_numpy(x1[:, 8:]))
    calib = task.calibration_batches()
    assert sum(a.shape[0] for a, _ in calib) == 8
    assert torch.equal(torch.cat([b for _, b in calib], dim=1), torch.from_numpy(x1[:, :8]))
    model = TwoInputs().eval()
    task.bind_reference(model)
    assert task.measure(model)["agreement"] == 100.0


def test_npz_with_integer_labels_measures_top1(tmp_path: Path) -> None:
    x = np.eye(10, 4, dtype=np.float32)
    y = np.zeros(10, dtype=np.int64)
    task = npz_task(_save(tmp_path / "lab.npz", x=x, y=y))
    assert task.headline == "top1" and task.metric == "top1"
    always0 = nn.Linear(4, 3)
    with torch.no_grad():
        always0.weight.zero_()
        always0.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert task.measure(always0) == {"top1": 100.0}
    batches = list(task.train_batches())
    assert sum(len(t) for _, t in batches) == 8
    # its top-1 reads the held samples, which are the validation ones: not a test figure
    assert task.evaluate_on_validation
    assert not npz_task(_save(tmp_path / "unl.npz", x=x)).evaluate_on_validation


def test_npz_with_float_targets_trains_on_mse(tmp_path: Path) -> None:
    x = np.ones((5, 4), np.float32)
    task = npz_task(_save(tmp_path / "reg.npz", x=x, y=np.zeros((5, 2), np.float32)))
    assert task.evaluate is None  # agreement: no labels to count
    (_inputs, target), *_ = list(task.train_batches())
    out = torch.ones_like(target)
    assert float(task.train_loss()(out, target)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 2), np.float32)}, "x0"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.int64)}, "y has 3 samples"),
        ({"x0": np.zeros((4, 2)), "x1": np.zeros((5, 2))}, "same number of samples"),
        ({"x": np.zeros((4, 2)), "batch_dims": np.array([0, 1])}, "batch_dims has 2 entries"),
        ({"x": np.zeros((1, 2))}, "at least 2 samples"),
        ({"x": np.array([[0.0, np.nan], [1.0, 2.0]])}, "1 NaN or infinite value"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.0, np.inf])}, "'y' holds 1 NaN"),
    ],
    ids=["no-x", "y-length", "sample-counts", "batch-dims", "one-sample", "nan-x", "inf-y"],
)
def test_npz_errors_say_what_to_fix(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(TaskError, match=message):
        npz_task(_save(tmp_path / "bad.npz", **arrays))


def test_npz_missing_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such file"):
        npz_task(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(TaskError, match=r"not a readable \.npz"):
        npz_task(tmp_path / "junk.npz")


# ---- image folders -------------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


class MeanColour(nn.Module):
    """Class = the channel with the largest mean (red 0, green 1, blue 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_image_folder_labelled_by_sub_folder(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "imgs" / "a_red" / f"{i}.png", (250, 0, 0))
        _png(tmp_path / "imgs" / "b_green" / f"{i}.png", (0, 250, 0))
    (tmp_path / "imgs" / "a_red" / "notes.txt").write_text("not an image")
    task = image_folder_task(tmp_path / "imgs", size=16, resize=18)
    assert [tuple(t.shape) for t in task.example_inputs] == [(1, 3, 16, 16)]
    assert task.headline == "top1" and task.evaluate is not None
    # every fifth image (0 and 5 of the sorted six) is held; the rest train with labels
    assert isinstance(task.train, TensorBatches) and task.train.target is not None
    assert task.train.target.tolist() == [0, 0, 1, 1]
    assert task.measure(MeanColour()) == {"top1": 100.0}
    # ImageNet normalisation of a uniform colour
    red = task.example_inputs[0][0, :, 0, 0]
    expected = [(250 / 255 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]
    assert red.tolist() == pytest.approx(expected, abs=1e-4)
    # the interval no normalised pixel can leave, for the data-free methods
    lo, hi = task.input_range(0)  # type: ignore[misc]
    assert lo == pytest.approx(-0.485 / 0.229) and hi == pytest.approx((1 - 0.406) / 0.225)
    values = torch.cat([b[0].flatten() for b in task.calibration_batches()])
    assert lo - 1e-5 <= float(values.min()) and float(values.max()) <= hi + 1e-5


def test_image_folder_numeric_class_folders_are_the_labels(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "imgs" / "7" / f"{i}.png", (0, 0, 250))
        _png(tmp_path / "imgs" / "3" / f"{i}.png", (0, 250, 0))
    # what Jupyter and macOS leave in folders: never a class, never an image
    _png(tmp_path / "imgs" / ".ipynb_checkpoints" / "0-checkpoint.png", (9, 9, 9))
    (tmp_path / "imgs" / "7" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    _png(tmp_path / "imgs" / "__MACOSX" / "7" / "0.png", (9, 9, 9))
    task = image_folder_task(tmp_path / "imgs", size=8, resize=8)
    assert isinstance(task.train, TensorBatches) and task.train.target is not None
    assert task.train.target.tolist() == [3, 3, 7, 7]


def test_flat_image_folder_measures_agreement(tmp_path: Path) -> None:
    for i, c in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (90, 90, 90), (0, 9, 0)]):
        _png(tmp_path / "flat" / f"{i}.jpg", c, size=(20, 30))
    task = image_folder_task(tmp_path / "flat", size=8, resize=10)
    assert task.evaluate is None and task.headline == "agreement"
    assert sum(b[0].shape[0] for b in task.validation_batches()) == 1  # every fifth of five
    task.bind_reference(MeanColour())
    assert task.measure(MeanColour())["agreement"] == 100.0


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such folder"):
        image_folder_task(tmp_path / "missing")
    _png(tmp_path / "one" / "0.png", (1, 2, 3))
    with pytest.raises(TaskError, match="found 1 image"):
        image_folder_task(tmp_path / "one")
    _png(tmp_path / "bad" / "0.png", (1, 2, 3))
    (tmp_path / "bad" / "1.png").write_bytes(b"not a png")
    with pytest.raises(TaskError, match="not a readable image"):
        image_folder_task(tmp_path / "bad")


def test_input_shape_sets_an_image_folders_crop(tmp_path: Path) -> None:
    """``--data DIR --input-shape 1,3,S,S`` reads the folder at the model's input size (the
    default, 224, would not fit a 32x32 model); an input a folder cannot give is refused."""
    from edgeslim.task.resolve import resolve_task

    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", (40 * i, 0, 0), size=(50, 40))
    task = resolve_task("models:net", str(tmp_path / "imgs"), input_shapes=[(1, 3, 32, 32)])
    assert [tuple(t.shape) for t in task.example_inputs] == [(1, 3, 32, 32)]
    assert tuple(resolve_task("m:f", str(tmp_path / "imgs")).example_inputs[0].shape) == (
        1, 3, 224, 224,
    )  # fmt: skip
    for shape in [(1, 2, 32, 32), (1, 3, 32, 24)]:
        with pytest.raises(TaskError, match="square RGB or grayscale crops"):
            resolve_task("m:f", str(tmp_path / "imgs"), input_shapes=[shape])


def test_a_grayscale_model_reads_an_image_folder_in_grayscale(tmp_path: Path) -> None:
    """``--input-shape 1,1,S,S``: the images are read as luma (an RGB file too), normalised
    with one mean and std, and the task says which; a normalisation for other channels is
    refused."""
    from edgeslim.task import image_folder_task
    from edgeslim.task.resolve import resolve_task
    from edgeslim.task.sources import GRAY_MEAN, GRAY_STD

    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", (60 * i, 60 * i, 60 * i), size=(40, 40))
    task = resolve_task("m:f", str(tmp_path / "imgs"), input_shapes=[(1, 1, 28, 28)])
    assert [tuple(t.shape) for t in task.example_inputs] == [(1, 1, 28, 28)]
    assert "grayscale" in task.description and str(list(GRAY_MEAN)) in task.description
    (x,) = task.calibration_batches()[0]
    gray = 60 * torch.arange(3.0)  # the files' grey levels, in file order
    expected = (gray / 255 - GRAY_MEAN[0]) / GRAY_STD[0]
    assert x.shape[1] == 1
    assert all(bool((expected - v).abs().min() < 0.02) for v in x[:, 0, 14, 14])
    own = image_folder_task(tmp_path / "imgs", size=28, resize=32, channels=1, mean=(0.5,),
                            std=(0.5,))  # fmt: skip
    assert "mean [0.5] std [0.5]" in own.description
    with pytest.raises(TaskError, match="one value per channel"):
        image_folder_task(tmp_path / "imgs", channels=1, mean=(0.5, 0.5, 0.5), std=(1, 1, 1))


# ---- the command line's task ---------------------------------------------------------------


@pytest.fixture
def unlabelled_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    return _save(tmp_path / "data.npz", x=rng.standard_normal((10, 4)).astype(np.float32))


def test_metric_module_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unlabelled_npz: Path
) -> None:
    (tmp_path / "my_metrics.py").write_text(
        textwrap.dedent(
            """
            def score(model):
                return {"score": 42.0, "params": sum(p.numel() for p in model.parameters())}

            def weight_norm(model):
                return float(model.weight.detach().norm())

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = nn.Linear(4, 3)
    task = resolve_task("my_models:net", str(unlabelled_npz), "my_metrics:score")
    assert task.headline == "score"
    assert task.measure(model) == {"score": 42.0, "params": 15.0}
    task = resolve_task("my_models:net", str(unlabelled_npz), "my_metrics:weight_norm")
    assert task.measure(model) == {
        "weight_norm": pytest.approx(float(model.weight.detach().norm()))
    }
    with pytest.raises(TaskError, match="cannot load 'my_metrics:missing'"):
        resolve_task("my_models:net", str(unlabelled_npz), "my_metrics:missing")
    with pytest.raises(TaskError, match="not a function"):
        resolve_task("my_models:net", str(unlabelled_npz), "my_metrics:NOT_A_FUNCTION")


def test_metric_by_name_picks_the_headline(unlabelled_npz: Path) -> None:
    task = resolve_task("my_models:net", str(unlabelled_npz), "cosine")
    model = nn.Linear(4, 12)
    task.bind_reference(model)
    m = task.measure(model)
    assert next(iter(m)) == "cosine" and math.isclose(m["cosine"], 1.0, abs_tol=1e-6)
    with pytest.raises(TaskError, match="allowed names: agreement"):
        resolve_task("my_models:net", str(unlabelled_npz), "top1")


def test_user_model_without_data_names_data() -> None:
    with pytest.raises(TaskError, match=r"Pass --data.*--input-shape 1,4 alone"):
        resolve_task("my_models:net", None, None, [(1, 4)])


def test_data_as_a_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_task.py").write_text(
        "import torch\n"
        "from edgeslim.task import Task\n"
        "def make():\n"
        "    return Task(example_inputs=(torch.zeros(1, 4),), name='mine')\n"
        "def broken():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_task("my_models:net", "my_task:make").name == "mine"
    with pytest.raises(TaskError, match=r"returned int, not an edgeslim\.Task"):
        resolve_task("my_models:net", "my_task:broken")


def test_input_shape_must_match_the_data_outside_batch_dims() -> None:
    task = Task(example_inputs=(torch.zeros(1, 8, 32), torch.zeros(1, 1, 16)), batch_dims=(0, 1))
    check_shapes(task, [(1, 8, 32), (1, 1, 16)])
    check_shapes(task, [(5, 8, 32), (1, 5, 16)])  # batch dimensions aside
    with pytest.raises(TaskError, match="does not match the data"):
        check_shapes(task, [(1, 8, 32), (1, 1, 17)])
    with pytest.raises(TaskError, match="does not match the data"):
        check_shapes(task, [(1, 8, 32)])


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), _Raises())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AttributeError("'LowRankLinear' object has no attribute 'weight'")


def test_a_model_failing_inside_the_metric_is_named_not_the_metric() -> None:
    x = torch.randn(8, 4)

    def top1(model: nn.Module) -> float:
        return float(model(x).argmax(-1).float().mean())

    task = Task(example_inputs=(x[:1],), evaluate=top1, metric="top1")
    with pytest.raises(TaskError, match=r"model raised AttributeError in `body.1` \(_Raises\)"):
        task.measure(_Broken())

    def broken_metric(model: nn.Module) -> float:
        raise ValueError("bad metric")

    task = Task(example_inputs=(x[:1],), evaluate=broken_metric, metric="m")
    with pytest.raises(TaskError, match="metric function raised ValueError"):
        task.measure(nn.Linear(4, 4))

    def reads_parameters(model: nn.Module) -> float:
        return float(next(model.parameters()).sum())

    # on the exported file (no parameters there), the message says it was that model
    task = Task(example_inputs=(x[:1],), evaluate=reads_parameters, metric="m")
    task.measure(nn.Linear(4, 4))
    with pytest.raises(TaskError, match="raised StopIteration on the ONNX Runtime file"):
        task.measure(nn.Identity(), wrapped=True)


@pytest.mark.parametrize("form", ["column", "one-hot", "one-hot-int"])
def test_npz_labels_as_a_column_or_one_hot_are_class_indices(tmp_path: Path, form: str) -> None:
    """A (N, 1) target broadcast against (N,) predictions counted nonsense; one-hot float
    rows were taken as regression targets."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    labels = x[:, :3].argmax(1)  # the model below is right on every sample
    y = {
        "column": labels[:, None],
        "one-hot": np.eye(3, dtype=np.float32)[labels],
        "one-hot-int": np.eye(3, dtype=np.int64)[labels],
    }[form]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = npz_task(tmp_path / "d.npz")
    assert task.headline == "top1"

    class FirstThree(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t[:, :3]

    assert task.measure(FirstThree()) == {"top1": 100.0}


def test_top1_refuses_targets_of_another_shape_than_the_predictions() -> None:
    from edgeslim.train.loop import evaluate

    batches = [((torch.randn(4, 3),), torch.zeros(4, 1, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"shape \[4\].*shape \[4, 1\]"):
        evaluate(nn.Identity(), batches)


def test_a_state_batched_on_the_wrong_dimension_is_a_task_error_naming_batch_dims() -> None:
    """An LSTM's initial state ``(layers, N, H)`` given with the default batch dimension 0:
    the example (batch 1) runs, a held batch of 8 does not; one TaskError naming
    ``batch_dims`` instead of an internal error."""

    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, batch_first=True)

        def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.lstm(x, (h, c))[0]

    x, h = torch.randn(8, 5, 4), torch.zeros(1, 8, 6)
    samples = [(x, h.transpose(0, 1).contiguous(), h.transpose(0, 1).contiguous())]
    task = Task(example_inputs=(x[:1], h[:, :1], h[:, :1]), calibration=samples)
    model = Stateful().eval()
    task.check(model)  # batch 1: the example runs
    with pytest.raises(TaskError, match=r"not on a batch of 8 .*batch_dims"):
        task.bind_reference(model)


def test_cosine_of_one_value_rows_is_their_correlation_not_their_sign() -> None:
    # a (N, 1, H, W) map has one value per row: the per-row cosine was the sign alone, 1.0
    # for any two positive maps (a sigmoid output), however far apart
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(64, 1, generator=g) + 0.1
    noise = torch.rand(64, 1, generator=g) + 0.1
    assert agreement_metrics(_ref(ref), [ref.clone()])["cosine"] == pytest.approx(1.0)
    assert agreement_metrics(_ref(ref), [noise])["cosine"] < 0.5
    assert agreement_metrics(_ref(ref), [2.0 * ref + 1.0])["cosine"] == pytest.approx(1.0)
    flat = torch.full((8, 1), 0.5)
    assert agreement_metrics(_ref(flat), [flat.clone()])["cosine"] == 1.0
    assert agreement_metrics(_ref(flat), [flat + 0.1])["cosine"] == 0.0
