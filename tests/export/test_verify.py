"""Verified export: untraceable models refused, parity checked on inputs of several sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import edgeslim
from edgeslim import Task, TensorBatches
from edgeslim.errors import EdgeslimError, TraceError
from edgeslim.export.command import export_checked
from edgeslim.export.verify import check_traceable, parity_inputs, perturbed

W8A8 = {"name": "w8a8", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8}]}


class Branchy(nn.Module):
    """Data-dependent control flow: inputs above 1.3 take another branch. The example,
    calibration and validation inputs (uniform in [0, 1)) never do; inputs scaled by 1.5 do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if x.abs().max() > 1.3:
            h = -h
        return self.fc(h.flatten(1))


def _task() -> Task:
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return Task(
        (x[:1],),
        calibration=TensorBatches(x[:32], batch_size=8),
        validation=TensorBatches(x[32:], batch_size=8),
    )


def test_perturbed_inputs_differ_but_integer_inputs_are_kept() -> None:
    x = torch.rand(4, 3)
    ids = torch.arange(6).reshape(2, 3)
    a, b = perturbed((x, ids), seed=0, noise=0.1, scale=1.5)
    assert not torch.allclose(a, x * 1.5) and torch.allclose(a, x * 1.5, atol=0.2)
    assert torch.equal(b, ids)


def test_parity_inputs_come_from_every_source() -> None:
    x = torch.rand(4, 1, 8, 8)
    names = [n for n, _ in parity_inputs((x[:1],), [(x,)] * 3, [(x,)] * 3)]
    assert names[0] == "example inputs"
    assert sum(n.startswith("calibration") for n in names) == 2
    assert sum(n.startswith("validation") for n in names) == 2
    assert sum(n.startswith("perturbed") for n in names) == 3


def test_an_untraceable_model_is_refused_naming_the_op_and_the_opt_in() -> None:
    with pytest.raises(TraceError, match=r"Branchy.*--trace-by-example"):
        check_traceable(Branchy())


def test_compress_refuses_it_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TraceError, match="data-dependent"):
        edgeslim.compress(Branchy(), W8A8, _task(), out=out, quick=True)
    assert list(tmp_path.iterdir()) == []


def test_trace_by_example_is_caught_by_the_perturbed_inputs(tmp_path: Path) -> None:
    """The export bakes in the example's branch; only the x1.5 perturbed input takes the
    other one, and that is enough to refuse the file."""
    with pytest.raises(EdgeslimError, match=r"perturbed input \(x1\.5.*traced by example"):
        edgeslim.compress(
            Branchy(), W8A8, _task(), out=tmp_path / "run", quick=True, trace_by_example=True
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EdgeslimError, match=r"perturbed input \(x1\.5"):
        export_checked(Branchy(), _task(), tmp_path / "m.onnx", trace_by_example=True)
    assert list(tmp_path.iterdir()) == []


def test_export_checked_writes_a_manifest_and_refuses_to_overwrite(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    out = tmp_path / "m.onnx"
    check = export_checked(net, _task(), out)
    assert check.inputs_checked == 8  # example, 2 calibration, 2 validation, 3 perturbed
    side = tmp_path / "m.onnx.manifest.json"
    assert out.is_file() and side.is_file() and "sha256" in side.read_text()
    with pytest.raises(EdgeslimError, match="exists; pass --force"):
        export_checked(net, _task(), out)
    export_checked(net, _task(), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.manifest.json"]


@pytest.mark.parametrize(
    ("kind", "layers", "bidirectional"), [(nn.LSTM, 2, True), (nn.GRU, 1, False)]
)
def test_float_view_of_a_quantized_recurrent_layer_is_the_torch_layer(
    kind: type[nn.RNNBase], layers: int, bidirectional: bool
) -> None:
    """``info --from`` shows a compressed model through its float view: a quantized LSTM
    there became a forward that called its (replaced) quantizers and crashed."""
    from edgeslim.export.verify import float_view
    from edgeslim.graph import layer_table
    from edgeslim.quant.config import w8a8
    from edgeslim.quant.ptq import ptq

    torch.manual_seed(0)
    rnn = kind(6, 8, layers, batch_first=True, bidirectional=bidirectional)
    model = nn.Sequential(rnn).eval()
    x = torch.randn(4, 5, 6)
    quantized = ptq(model, w8a8(), x, select={"0": w8a8()} if kind is nn.GRU else None)
    view = float_view(quantized)
    layer = view.get_submodule("0")
    assert type(layer) is kind and layer.num_layers == layers
    with torch.no_grad():  # the weights are the quantized model's (float): close outputs
        torch.testing.assert_close(view(x)[0], quantized(x)[0], atol=0.05, rtol=0.05)
    assert layer_table(view, x[:1])["0"].macs == layer_table(model, x[:1])["0"].macs


def test_a_batch_traced_as_a_constant_is_named_without_dynamic_dims(tmp_path: Path) -> None:
    """The file runs at batch 1 only; the advice is about the batch, since the file has no
    free dimension besides it (it was not exported with --dynamic-dims)."""
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.verify import check_parity
    from edgeslim.runtime.ort import ort_session

    class LiteralBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(int(x.shape[0]), -1))  # int(): a constant in the trace

    model = LiteralBatch().eval()
    path = export_onnx(model, (torch.randn(1, 3, 4),), tmp_path / "m.onnx")
    with pytest.raises(EdgeslimError, match=r"cannot run the exported file") as info:
        check_parity(model, ort_session(path), [(torch.randn(2, 3, 4),)])
    assert "x.shape[0]" in str(info.value) and "--dynamic-dims" not in str(info.value)


def test_a_value_onnx_runtime_refuses_is_not_blamed_on_a_size() -> None:
    """ONNX Runtime refusing a value in the file (a QLinear operator's scale out of its
    range) had the size advice appended, which sent the user after their ``view`` calls."""
    from types import SimpleNamespace

    from edgeslim.export.verify import _unrunnable

    session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(shape=["batch", 3, 8, 8])])
    inputs = (torch.zeros(1, 3, 8, 8),)
    value = _unrunnable(session, "example inputs", inputs, RuntimeError(
        "QLinearGlobalAveragePool : parameter out of computation range!"))  # fmt: skip
    assert "report this" in str(value) and "fixed a size" not in str(value)
    size = _unrunnable(session, "example inputs", inputs, RuntimeError(
        "Reshape: the input tensor cannot be reshaped to the requested shape"))  # fmt: skip
    assert "fixed a size" in str(size)
    assert "x.view(x.shape[0], -1)" in str(size)
