"""Dimensions besides the batch left free in the ONNX file (``Task.dynamic_dims``): a
segmenter's height and width. The file runs at other sizes with torch's outputs, and a
model whose code fixes a size is refused naming the dimensions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import Task, TensorBatches
from edgeslim.errors import TaskError
from edgeslim.export.command import export_checked
from edgeslim.runtime.ort import ort_session
from edgeslim.task.resolve import resolve_task


class Segmenter(nn.Module):
    """Stride-2 encoder, bilinear upsampling back to the input size, 4 classes per pixel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.enc(x))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


def _task(**kw: object) -> Task:
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=4), **kw)  # type: ignore[arg-type]


def test_free_height_and_width_run_at_other_sizes(tmp_path: Path) -> None:
    model = Segmenter().eval()
    check = export_checked(model, _task(dynamic_dims=((2, 3),)), tmp_path / "m.onnx")
    session = ort_session(check.path)
    assert session.get_inputs()[0].shape[2:] != [16, 16]  # symbolic, not the example's
    for h, w in ((24, 40), (8, 8)):
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
    # without them only the batch is free: ONNX Runtime refuses another size
    check = export_checked(model, _task(), tmp_path / "fixed.onnx")
    assert ort_session(check.path).get_inputs()[0].shape[2:] == [16, 16]


def test_a_model_fixing_its_size_is_refused_naming_the_dimensions(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    with pytest.raises(TaskError, match=r"dynamic dimensions \[\[2, 3\]\].*flatten into a Linear"):
        export_checked(model.eval(), _task(dynamic_dims=((2, 3),)), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("dims", "match"), [(((0, 2),), "dimension 0"), (((4,),), "dimension 4"),
                                             (((2,), (2,)), "for 2 inputs")])  # fmt: skip
def test_impossible_dimensions_are_refused(dims: tuple[tuple[int, ...], ...], match: str) -> None:
    with pytest.raises(TaskError, match=match):
        _task(dynamic_dims=dims)


def test_the_command_line_sets_them_on_the_task(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.random.default_rng(0).normal(size=(8, 3, 16, 16)))
    task = resolve_task("m", str(tmp_path / "s.npz"), dynamic_dims=((2, 3),))
    assert task.dynamic_dims == ((2, 3),)
    assert task.resized(task.example_inputs)[0].shape == (1, 3, 32, 32)


def test_a_compressed_copy_that_fixed_the_size_is_refused() -> None:
    """A traced copy whose graph resolved ``int(x.shape[2])`` keeps the example's size at
    every input; its file would too and would match it on every check."""
    from edgeslim.export.verify import check_resized

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.interpolate(Segmenter()(x), size=(16, 16))

    task = _task(dynamic_dims=((2, 3),))
    said = r"gives outputs \[\[1, 4, 16, 16\]\].*\[\[1, 4, 32, 32\]\]"
    with pytest.raises(TaskError, match=said):
        check_resized(task, Fixed().eval(), Segmenter().eval())
    check_resized(task, Segmenter().eval(), Segmenter().eval())  # the same sizes: no error


def test_a_file_that_cannot_run_another_size_is_named(tmp_path: Path) -> None:
    """torch's exporter writes nn.MultiheadAttention with the traced sequence length: the
    file fails on the doubled batch, which is said, not an internal error."""
    from edgeslim.errors import EdgeslimError

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(0))
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=4),
                dynamic_dims=((1,),))  # fmt: skip
    try:
        export_checked(Attend().eval(), task, tmp_path / "m.onnx")
    except EdgeslimError as exc:
        said = str(exc)
        assert "ONNX Runtime cannot run the exported file" in said and "--dynamic-dims" in said
    else:  # an exporter that keeps the length free: the file must then run at other lengths
        session = ort_session(tmp_path / "m.onnx")
        (got,) = session.run(None, {"input": torch.randn(2, 9, 8).numpy()})
        assert got.shape == (2, 9, 8)
