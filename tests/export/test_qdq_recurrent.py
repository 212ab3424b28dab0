"""What ONNX Runtime runs for the new quantized operators: integer kernels (QLinearConv for
Conv1d and grouped/depthwise/dilated Conv2d, QGemm for the cells' and forced GRU/RNN
matmuls, one DynamicQuantizeLSTM per LSTM layer) or the documented float fallbacks
(ConvTranspose; GRU/RNN by default), and that the files compute what torch does."""

from __future__ import annotations

import copy
from dataclasses import replace
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
from edgeslim.quant.recurrent import QuantRNN
from edgeslim.runtime.kernels import kernel_coverage
from edgeslim.runtime.ort import OrtModel, ort_fused_ops, ort_session

# Weights on 7 bits (reduce_range) throughout: ONNX Runtime computes what torch does on every
# x86 CPU; full-range weights saturate its 16-bit sums on CPUs without VNNI (docs/quantization.md)

# int8 fake-quant torch vs the QDQ file in ONNX Runtime (same grids; float op order differs)
MAX_TORCH_ORT_REL = 0.01
# LSTM: ONNX Runtime's DynamicQuantizeLSTM quantizes x and h per call, the torch simulation
# with the calibrated static ranges; measured < 0.011 relative L2. Against fp32 the file is
# as far as the simulation is (percentile-clipped random inputs: up to 0.07 on 3 logits)
MAX_LSTM_ORT_REL = 0.02
MAX_LSTM_FP32_REL = 0.1
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


def _export(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, reduce_range: bool = True
) -> tuple[Path, Any]:
    torch.manual_seed(0)
    calib = [tuple(torch.randn(32, *t.shape[1:]) for t in inputs) for _ in range(2)]
    q = ptq(model.eval(), w8a8(reduce_range=reduce_range), calib)
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


@pytest.mark.parametrize("w_bits", [8, 7, 4])
def test_conv_transpose_runs_in_float_with_a_warning(w_bits: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, output_padding=1)
    path, q = tmp_path / "m.onnx", Conv(layer)
    calib = [(torch.randn(32, 8, 6, 6),) for _ in range(2)]
    config = w8a8()
    assert config.weight is not None
    config = replace(config, weight=replace(config.weight, bits=w_bits))
    q = ptq(q.eval(), config, calib)
    with pytest.warns(UserWarning, match="no integer ConvTranspose kernel"):
        export_qdq(q, (torch.randn(1, 8, 6, 6),), path)
    ops = ort_fused_ops(path)
    assert ops.get("ConvTranspose") == 1 and "QLinearConvTranspose" not in ops, ops
    graph = onnx.load(str(path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    # stored as int8 codes (out-major) at every width, a sub-7-bit grid's codes times
    # 2^(7 - b) (the same levels on a finer step)
    assert [list(i.dims) for i in int8] == [[16, 8, 3, 3]]
    codes = onnx.numpy_helper.to_array(int8[0])
    spread = 2 ** max(0, 7 - w_bits)
    assert np.abs(codes).max() <= (2 ** (w_bits - 1) - 1) * spread
    assert (codes % spread == 0).all()
    assert not [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                and list(i.dims) == [8, 16, 3, 3]]  # fmt: skip
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


def _forced(model: Seq) -> Seq:
    """``model`` with its GRU/RNN already a twin: default PTQ keeps them float (ONNX Runtime
    has no integer GRU kernel), ``ptq`` calibrates a twin it finds in place."""
    if type(model.rnn) in (nn.GRU, nn.RNN):
        model.rnn = QuantRNN.from_float(model.rnn, w8a8(reduce_range=True))
    return model


@pytest.mark.parametrize("kind", ["gru", "rnn_bidir"])
def test_forced_gru_and_rnn_unroll_into_qgemm_per_step(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    rnn: nn.Module = {
        "gru": lambda: nn.GRU(5, 8, batch_first=True),
        "rnn_bidir": lambda: nn.RNN(5, 8, batch_first=True, bidirectional=True),
    }[kind]()
    path, q = _export(_forced(Seq(rnn)), (torch.randn(1, 6, 5),), tmp_path / "m.onnx")
    ops = ort_fused_ops(path)
    dirs = 2 if kind == "rnn_bidir" else 1
    # per direction: one input projection over batch*time + one hh matmul per step; + head
    assert ops.get("QGemm") == dirs * (1 + 6) + 1 and not FLOAT_OPS & set(ops), ops
    graph = onnx.load(str(path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 2 * dirs + 1  # each gate matrix stored once, not once per step
    _check_parity(q, path, [(6, 5)])


def test_gru_stays_a_fused_float_gru_by_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="ONNX Runtime has no integer GRU kernel"):
        path, q = _export(Seq(nn.GRU(5, 8, batch_first=True)), (torch.randn(1, 6, 5),),
                          tmp_path / "m.onnx")  # fmt: skip
    ops = ort_fused_ops(path)
    assert ops.get("GRU") == 1 and ops.get("QGemm") == 1, ops
    _check_parity(q, path, [(6, 5)])


LSTMS = {
    "lstm": lambda: nn.LSTM(5, 8, batch_first=True),
    "lstm_2layer_bidir": lambda: nn.LSTM(5, 8, num_layers=2, batch_first=True, bidirectional=True),
    "lstm_no_bias": lambda: nn.LSTM(5, 8, batch_first=True, bias=False),
}


def _lstm_export(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, config: Any = None
) -> tuple[Path, nn.Module]:
    """W8A8 PTQ + QDQ export with the batch *and* the time axis dynamic."""
    torch.manual_seed(0)
    calib = [tuple(torch.randn(32, *t.shape[1:]) for t in inputs) for _ in range(2)]
    q = ptq(copy.deepcopy(model).eval(), config or w8a8(reduce_range=True), calib)
    names = [f"in{i}" for i in range(len(inputs))]
    axes = {"in0": {0: "batch", 1: "time"}, "out0": {0: "batch"}, "out1": {0: "batch", 1: "time"}}
    export_qdq(q, inputs, path, input_names=names, output_names=["out0", "out1"],
               dynamic_axes=axes)  # fmt: skip
    return path, q


def _check_lstm(q: nn.Module, fp32: nn.Module, path: Path) -> None:
    """ORT vs the torch W8A8 simulation and vs fp32, at several batches and lengths."""
    ort = OrtModel(ort_session(path))
    for batch, steps in ((1, 6), (5, 6), (3, 11)):  # the sequence length stays dynamic
        x = torch.randn(batch, steps, 5)
        with torch.no_grad():
            sim, ref = q(x), fp32(x)
        got = ort(x)
        for g, s, r in zip(got, sim, ref, strict=True):
            assert _rel(g, s) < MAX_LSTM_ORT_REL, f"({batch}, {steps}): vs torch {_rel(g, s):.4f}"
            # no further from fp32 than the simulation is, up to the dynamic/static gap
            err = _rel(g, r)
            assert err <= _rel(s, r) + MAX_LSTM_ORT_REL, f"({batch}, {steps}): vs fp32 {err:.4f}"
            assert err < MAX_LSTM_FP32_REL, f"({batch}, {steps}): vs fp32 {err:.4f}"


@pytest.mark.parametrize("kind", list(LSTMS))
def test_lstm_runs_as_one_dynamic_quantize_lstm_per_layer(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    rnn = LSTMS[kind]()
    fp32 = Seq(rnn).eval()
    path, q = _lstm_export(fp32, (torch.randn(1, 6, 5),), tmp_path / "m.onnx")
    layers = rnn.num_layers
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DynamicQuantizeLSTM") == layers and "LSTM" not in ops, ops
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in model.opset_import)
    fused = ort_fused_ops(path)
    assert fused.get("DynamicQuantizeLSTM") == layers and not FLOAT_OPS & set(fused), fused
    dirs = 2 if rnn.bidirectional else 1
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    inits = {i.name: i for i in model.graph.initializer}
    w, r, w_scale = (inits[node.input[i]] for i in (1, 2, 8))
    assert list(w.dims) == [dirs, 5, 32] and w.data_type == onnx.TensorProto.INT8
    assert list(r.dims) == [dirs, 8, 32] and r.data_type == onnx.TensorProto.INT8
    assert list(w_scale.dims) == [dirs, 32]  # per output channel (gate row)
    assert not [
        i for i in model.graph.initializer if list(i.dims) in ([dirs, 32, 5], [dirs, 32, 8])
    ]
    x1 = torch.randn(1, 6, 5)
    assert kernel_coverage(path, (x1,)).int8_mac_share == pytest.approx(1.0)
    _check_lstm(q, fp32, path)


def test_lstm_per_tensor_weights_and_state_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Cell(nn.LSTM(5, 8, batch_first=True)).eval()
    model.lstm = True  # (x, (h, c)) as nn.LSTM takes them
    inputs = (torch.randn(1, 6, 5), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    calib = [tuple(torch.randn(32, *t.shape[1:]) for t in inputs) for _ in range(2)]
    q = ptq(copy.deepcopy(model), w8a8("tensor", reduce_range=True), calib)
    path = tmp_path / "m.onnx"
    axes = {"x": {0: "b"}, "h": {1: "b"}, "c": {1: "b"}, "y": {0: "b"}}
    export_qdq(q, inputs, path, input_names=["x", "h", "c"], output_names=["y", "h_n", "c_n"],
               dynamic_axes=axes)  # fmt: skip
    graph = onnx.load(str(path)).graph
    (node,) = [n for n in graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert node.input[5] and node.input[6]  # initial_h, initial_c from the model inputs
    inits = {i.name: i for i in graph.initializer}
    assert list(inits[node.input[8]].dims) == [1]  # per tensor: [num_directions]
    ort = OrtModel(ort_session(path))
    for batch in (1, 4):
        args = (torch.randn(batch, 6, 5), torch.randn(1, batch, 8), torch.randn(1, batch, 8))
        with torch.no_grad():
            sim = _flat_out(q(*args))
        for g, s in zip(_flat_out(ort(*args)), sim, strict=True):
            assert _rel(g, s) < MAX_LSTM_ORT_REL


def _flat_out(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat_out(o)]


def test_float_lstm_kept_by_select_stays_a_float_lstm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Seq(nn.LSTM(5, 8, batch_first=True)).eval()
    inputs = (torch.randn(1, 6, 5),)
    calib = [(torch.randn(32, 6, 5),)]
    q = ptq(model, w8a8(reduce_range=True), calib, select={"rnn": None})
    path = tmp_path / "m.onnx"
    export_qdq(q, inputs, path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "LSTM" in ops and "DynamicQuantizeLSTM" not in ops


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
