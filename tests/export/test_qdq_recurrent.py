"""What ONNX Runtime runs for the new quantized operators: integer kernels (QLinearConv for
Conv1d and grouped/depthwise/dilated Conv2d, QGemm for the recurrent matmuls) or the
documented float fallback (ConvTranspose), and that the files compute what torch does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.export.qdq import export_qdq
from edgeslim.export.recurrent import dedupe_shared_definitions
from edgeslim.quant.config import w8a8
from edgeslim.quant.ptq import ptq
from edgeslim.runtime.ort import OrtModel, ort_fused_ops, ort_session

# int8 fake-quant torch vs the QDQ file in ONNX Runtime (same grids; float op order differs)
MAX_TORCH_ORT_REL = 0.01
FLOAT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Conv(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(torch.relu(x)))


class Cell(nn.Module):
    """One recurrent cell step with its state as inputs: returns ``(h, c)``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.lstm = isinstance(cell, nn.LSTMCell)  # decided now: the twin is another type

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:
        if self.lstm:
            return self.cell(x, (h, c))
        return self.cell(x, h), c


class Seq(nn.Module):
    """A sequence layer over ``(batch, time=6, 5)`` and a linear head on the last step."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(8 * (2 if getattr(rnn, "bidirectional", False) else 1), 3)

    def forward(self, x: torch.Tensor) -> Any:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1]), out


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> tuple[Path, Any]:
    torch.manual_seed(0)
    calib = [tuple(torch.randn(32, *t.shape[1:]) for t in inputs) for _ in range(2)]
    q = ptq(model.eval(), w8a8(), calib)
    names = [f"in{i}" for i in range(len(inputs))]
    with torch.no_grad():
        n_out = len(q(*inputs)) if isinstance(q(*inputs), tuple) else 1
    outs = [f"out{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in names + outs}
    export_qdq(q, inputs, path, input_names=names, output_names=outs, dynamic_axes=axes)
    return path, q


def _check_parity(q: nn.Module, path: Path, shapes: list[tuple[int, ...]]) -> None:
    ort = OrtModel(ort_session(path))
    for batch in (1, 5):  # the batch axis stays dynamic, unrolled loops included
        inputs = tuple(torch.randn(batch, *s) for s in shapes)
        with torch.no_grad():
            want = q(*inputs)
        got = ort(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        for w, g in zip(want, got, strict=True):
            assert _rel(g, w) < MAX_TORCH_ORT_REL, f"batch {batch}: {_rel(g, w):.4f}"


CONVS = {
    "conv1d": (lambda: nn.Conv1d(8, 16, 3, padding=1), (8, 20)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), (8, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 9, 9)),
    "conv2d_dilated": (lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2), (8, 9, 9)),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_convs_run_as_qlinearconv(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    make, shape = CONVS[name]
    path, q = _export(Conv(make()), (torch.randn(1, *shape),), tmp_path / "m.onnx")
    ops = ort_fused_ops(path)
    assert ops.get("QLinearConv") == 1 and not FLOAT_OPS & set(ops), ops
    _check_parity(q, path, [shape])


def test_conv_transpose_runs_in_float_with_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, output_padding=1)
    with pytest.warns(UserWarning, match="no integer ConvTranspose kernel"):
        path, q = _export(Conv(layer), (torch.randn(1, 8, 6, 6),), tmp_path / "m.onnx")
    ops = ort_fused_ops(path)
    assert ops.get("ConvTranspose") == 1 and "QLinearConvTranspose" not in ops, ops
    graph = onnx.load(str(path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert [list(i.dims) for i in int8] == [[16, 8, 3, 3]]  # stored int8 (out-major)
    _check_parity(q, path, [(8, 6, 6)])


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
def test_cells_run_their_matmuls_as_qgemm(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cell = nn.LSTMCell(6, 8) if kind == "lstm_cell" else nn.GRUCell(6, 8)
    inputs = (torch.randn(1, 6), torch.randn(1, 8), torch.randn(1, 8))
    path, q = _export(Cell(cell), inputs, tmp_path / "m.onnx")
    ops = ort_fused_ops(path)
    assert ops.get("QGemm") == 2 and not FLOAT_OPS & set(ops), ops
    _check_parity(q, path, [(6,), (8,), (8,)])


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_bidir"])
def test_sequences_unroll_into_qgemm_per_step(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    rnn: nn.Module = {
        "lstm": lambda: nn.LSTM(5, 8, batch_first=True),
        "gru": lambda: nn.GRU(5, 8, batch_first=True),
        "lstm_bidir": lambda: nn.LSTM(5, 8, batch_first=True, bidirectional=True),
    }[kind]()
    path, q = _export(Seq(rnn), (torch.randn(1, 6, 5),), tmp_path / "m.onnx")
    ops = ort_fused_ops(path)
    dirs = 2 if kind == "lstm_bidir" else 1
    # per direction: one input projection over batch*time + one hh matmul per step; + head
    assert ops.get("QGemm") == dirs * (1 + 6) + 1 and not FLOAT_OPS & set(ops), ops
    graph = onnx.load(str(path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 2 * dirs + 1  # each gate matrix stored once, not once per step
    _check_parity(q, path, [(6, 5)])


def test_dedupe_keeps_identical_and_refuses_conflicting_definitions() -> None:
    from onnx import helper, numpy_helper

    a = numpy_helper.from_array(np.ones(2, np.float32), "w")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    node = helper.make_node("Identity", ["w"], ["y"])
    graph = helper.make_graph([node, node], "g", [], [], [a, a])
    model = helper.make_model(graph)
    assert dedupe_shared_definitions(model) == 2
    assert len(model.graph.node) == 1 and len(model.graph.initializer) == 1
    clash = helper.make_model(helper.make_graph([node], "g", [], [], [a, b]))
    with pytest.raises(EdgeslimError, match="two different initializers named w"):
        dedupe_shared_definitions(clash)
