from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from edgeslim.export import export_onnx, onnx_parity
from edgeslim.runtime.ort import ort_predict, ort_session
from edgeslim.zoo.mobilenetv2 import mobilenetv2_small
from edgeslim.zoo.resnet import resnet20


@pytest.mark.parametrize("factory", [resnet20, mobilenetv2_small])
def test_export_matches_torch_with_dynamic_batch(factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = factory().eval()
    path = export_onnx(model, (torch.randn(1, 1, 28, 28),), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.randn(5, 1, 28, 28)
    parity = onnx_parity(model, path, (x,))
    assert parity.ok and parity.max_abs_diff <= 1e-4
    logits = ort_predict(ort_session(path), x, batch_size=2)
    assert logits.shape == (5, 10)


def test_parity_detects_a_different_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = resnet20().eval(), resnet20().eval()
    path = export_onnx(a, (torch.randn(1, 1, 28, 28),), tmp_path / "a.onnx")
    assert not onnx_parity(b, path, (torch.randn(2, 1, 28, 28),)).ok


def test_export_names_a_size_that_must_be_constant(tmp_path: Path) -> None:
    """torch's exporter refuses a kernel size read from a shape; the error says what to use."""
    from edgeslim.errors import ExportError

    class ShapePooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.avg_pool2d(x, x.shape[2:]).flatten(1)

    with pytest.raises(ExportError, match=r"must be a constant in ONNX: use `nn.AdaptiveAvgPool2d"):
        export_onnx(ShapePooled().eval(), (torch.randn(1, 2, 10, 6),), tmp_path / "m.onnx")


def test_an_op_of_a_newer_opset_exports_at_that_opset(tmp_path: Path) -> None:
    """``F.fold`` (col2im) exists from opset 18: the export was refused at 17."""
    import onnxruntime as ort
    import torch.nn.functional as F

    class Fold(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = F.unfold(self.conv(x), 2, stride=2)
            return F.fold(patches * 2, (8, 8), 2, stride=2)

    torch.manual_seed(0)
    model = Fold().eval()
    path = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "fold.onnx")
    assert [o.version for o in onnx.load(str(path)).opset_import if not o.domain] == [18]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() < 1e-5


class MaskedWhenTraced(nn.Module):
    """Hugging Face's masks: skipped when all ones, but kept under tracing, where this
    model's reduced attention cannot add it (Nystromformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.fc(x)  # (B, T, 4): four landmarks, not T keys
        if torch.jit.is_tracing():
            scores = scores + torch.zeros(x.shape[0], x.shape[1], x.shape[1])
        return scores.softmax(-1)


def test_a_model_failing_only_under_the_exporter_is_named_at_its_line(tmp_path: Path) -> None:
    from edgeslim.errors import ExportError

    model = MaskedWhenTraced().eval()
    x = torch.randn(1, 7, 6)
    assert model(x).shape == (1, 7, 4)  # runs outside the exporter
    with pytest.raises(ExportError) as info:
        export_onnx(model, (x,), tmp_path / "m.onnx")
    text = str(info.value)
    assert "MaskedWhenTraced" in text and "test_onnx.py" in text
    assert "scores = scores + torch.zeros" in text and "RuntimeError" in text


class Patches(nn.Module):
    """PatchTST's patchifier: ``unfold`` along the time axis counted from the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unfold(-2, 8, 8).transpose(-2, -3).contiguous() * 2


def test_unfold_with_a_negative_dimension_exports_right(tmp_path: Path) -> None:
    """torch's exporter alone writes these patches along the wrong axis (the file does not
    even load in ONNX Runtime)."""
    x = torch.randn(2, 32, 3)
    path = export_onnx(Patches(), (x[:1],), tmp_path / "p.onnx")
    torch.testing.assert_close(ort_predict(ort_session(path), x), Patches()(x))
    assert torch.Tensor.unfold.__qualname__ == "TensorBase.unfold"  # torch's own again


class PyramidPool(nn.Module):
    """A pyramid pooling module (PSPNet, UperNet): 1, 2, 3 and 6 bins of an 8x10 map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pools = nn.ModuleList([nn.AdaptiveAvgPool2d(s) for s in (1, 2, 3, (6, None))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([p(y).flatten(1) for p in self.pools], 1)


def test_adaptive_pools_to_sizes_that_do_not_divide_the_input_export(tmp_path: Path) -> None:
    """torch's exporter alone refuses the 3x3 and 6x10 pools ("output size that are not
    factor of input size")."""
    torch.manual_seed(0)
    model = PyramidPool().eval()
    x = torch.randn(3, 3, 8, 10)
    path = export_onnx(model, (x[:1],), tmp_path / "psp.onnx")
    torch.testing.assert_close(ort_predict(ort_session(path), x), model(x), rtol=1e-4, atol=1e-5)
    assert torch.nn.functional.adaptive_avg_pool2d.__module__ == "torch.nn.functional"


class PackedSequences(nn.Module):
    """Hugging Face's packed-sequence check: ``torch.diff`` of the positions, then the
    ``cumsum`` of a boolean tensor (torch gives int64; the exporter wrote a boolean CumSum
    ONNX Runtime refuses, and had no ``diff`` at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.cumsum(torch.ones_like(x[..., 0]), -1)
        first = pos[:, :1] - 1
        starts = (torch.diff(pos, prepend=first, dim=-1) != 1).cumsum(-1)
        return self.fc(x) + starts[..., None].float()


def test_diff_and_a_boolean_cumsum_export(tmp_path: Path) -> None:
    model = PackedSequences().eval()
    x = torch.randn(3, 5, 6)
    path = export_onnx(model, (x[:1],), tmp_path / "p.onnx")
    torch.testing.assert_close(ort_predict(ort_session(path), x), model(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(torch.diff, "__wrapped__") and torch.diff.__module__ == "torch"
