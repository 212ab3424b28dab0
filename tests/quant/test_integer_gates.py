"""Hardswish / hardsigmoid with an integer gate: exact up to the gate's 8-bit step, placed
by the edge pass, exported so that ONNX Runtime runs no float op between integer kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.export.qdq import export_qdq
from edgeslim.quant import calibrate, fold_batchnorm, quantize_, w8a8
from edgeslim.quant.edges import quantize_edges
from edgeslim.quant.integer_gates import IntegerGate, IntegerHardsigmoid, IntegerHardswish
from edgeslim.quant.modules import ActQuant
from edgeslim.runtime.kernels import optimized_graph
from edgeslim.runtime.ort import ort_session

STEP = 1.0 / 255  # the gate's grid on [0, 1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-12.0, 12.0, allow_nan=False, width=32), min_size=1, max_size=64))
def test_integer_gates_are_within_half_a_gate_step(values: list[float]) -> None:
    x = torch.tensor(values)
    sig, swish = IntegerHardsigmoid(), IntegerHardswish()
    gate = sig(x)
    assert torch.all((gate - nn.functional.hardsigmoid(x)).abs() <= STEP / 2 + 1e-6)
    assert torch.all(torch.isclose(gate * 255, (gate * 255).round(), atol=1e-3))  # on the grid
    bound = x.abs() * (STEP / 2 + 1e-6) + 1e-6  # float32 rounding of the product on a tie
    assert torch.all((swish(x) - nn.functional.hardswish(x)).abs() <= bound)


def test_the_gate_range_survives_calibration() -> None:
    """Calibration on inputs far outside [-3, 3] must not move the fixed [0, 6] grid."""
    model = nn.Sequential(IntegerHardswish())
    q = model[0].gate
    scale = float(q.quantizer.scale)
    calibrate(model, [(torch.linspace(-50, 50, 101),)], progress=False)
    assert float(q.quantizer.scale) == scale == np.float32(6 / 255)
    assert q.mode == "quant"


class _SE(nn.Module):
    """conv -> hardswish -> conv, a squeeze-excite gate (F.hardsigmoid), a linear head.

    ``gain`` scales the convs' weights: at 4 the hardswish inputs reach below -3 as a
    trained network's do (their grids then put -3 on a code); at 1 they stay within
    about [-2.3, 2.2] and keep the fixed-grid gates."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.Hardswish()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():
            self.conv1.weight.mul_(gain)
            self.conv2.weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.conv1(x)))
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        x = nn.functional.hardswish(x * gate)
        return self.head(torch.flatten(self.pool(x), 1))


def _quantized(model: nn.Module, data: torch.Tensor) -> torch.fx.GraphModule:
    model = model.eval()
    fold_batchnorm(model)
    quantize_(model, w8a8(reduce_range=True))  # (7-bit weights: exact in ORT on any CPU)
    gm = quantize_edges(model)
    calibrate(gm, [(data,)], progress=False)
    return gm.eval()


def test_edge_pass_replaces_the_gates_and_quantizes_their_inputs_once() -> None:
    torch.manual_seed(0)
    model = _SE()
    bias = model.fc2.bias.detach().clone()
    gm = _quantized(model, torch.randn(16, 3, 12, 12))
    assert torch.allclose(gm.fc2.bias, bias + 3.0)
    kinds = [type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count(IntegerHardswish) == 2 and kinds.count(IntegerHardsigmoid) == 1
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid)) for m in gm.modules())
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(str(n.target))
        if not isinstance(m, IntegerGate):
            continue
        src = gm.get_submodule(str(n.args[0].target))
        if isinstance(m, IntegerHardswish):  # input quantized like an add's
            assert isinstance(src, ActQuant)
        else:  # + 3 folded into the bias of fc2 alone
            assert src is gm.fc2 and m.shift == 0.0
        if type(m) is IntegerHardsigmoid:  # its output already on a grid: no second quantizer
            assert not any(
                u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), ActQuant)
                for u in n.users
            )


def test_exported_gates_run_as_integer_kernels(tmp_path: Path) -> None:
    """ONNX Runtime's optimised graph has no float op left between the input's quantizer
    and the head; its output matches the torch simulation."""
    torch.manual_seed(0)
    model = _SE(gain=4.0)
    data = torch.randn(32, 3, 12, 12)
    gm = _quantized(model, data)
    x = data[:4]
    path = export_qdq(gm, (x[:1],), tmp_path / "int8.onnx")
    import onnx

    ops = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp_path / "o.onnx"))).graph.node]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops and "Mul" not in ops, ops
    # each hardswish: a Clip on its input's codes and a QLinearMul; the SE gate folded
    assert ops.count("Clip") == 2 and ops.count("QLinearMul") == 3, ops
    assert "QLinearAdd" not in ops, ops
    assert ops.count("DequantizeLinear") == 0, ops
    sess = ort_session(path)
    with torch.no_grad():
        expected = gm(x).numpy()
    for i in range(len(x)):  # more than one input
        got = sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1].numpy()})[0]
        assert np.abs(got - expected[i : i + 1]).max() <= 0.05 * np.abs(expected).max()


def test_compress_a_user_hardswish_model_to_integer_onnx(tmp_path: Path) -> None:
    """The public path on a model the project did not make: ``edgeslim.compress`` with a
    W8A8 recipe exports a file whose every MAC and gate runs on integers in ONNX Runtime;
    the hardsigmoid's shift is folded through the folded BatchNorm into the conv."""
    import json

    import edgeslim
    from edgeslim.task import digits_task

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardsigmoid(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    recipe = {
        "name": "w8a8",
        "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8, "reduce_range": True}],
    }  # (any CPU)
    out = tmp_path / "run"
    edgeslim.compress(model, recipe, digits_task(), out=out, quick=True)
    import onnx

    optimized = onnx.load(str(optimized_graph(out / "model.onnx", tmp_path / "o.onnx")))
    ops = [n.op_type for n in optimized.graph.node]
    assert not {"HardSwish", "HardSigmoid", "Mul", "Conv"} & set(ops), ops
    # hardsigmoid's + 3 went into the conv's bias; this untrained hardswish's input stays
    # above -3, so its gate keeps the fixed grid (one QLinearAdd), not a Clip on its codes
    assert ops.count("QLinearAdd") == 1 and "Clip" not in ops, ops
    records = json.loads((out / "results.json").read_text())
    ort_record = next(r for r in records if r["runtime"] == "onnxruntime")
    assert ort_record["extra"]["int8_mac_share"] >= 0.95


def test_int8_activations_keep_float_gates_and_every_integer_conv(tmp_path: Path) -> None:
    """With symmetric (int8) activations the uint8 gate would mix types in ONNX Runtime's
    integer kernels (a conv writing the gate lost its QLinearConv): the gates stay float."""
    import onnx

    from edgeslim.quant import QuantConfig, QuantSpec

    torch.manual_seed(0)
    model, data = _SE().eval(), torch.randn(32, 3, 12, 12)
    act = QuantSpec(bits=8, granularity="tensor", symmetric=True)
    quantize_(model, QuantConfig(QuantSpec(bits=7), act))  # 7-bit: exact on any CPU
    gm = quantize_edges(model)
    assert not any(isinstance(m, IntegerGate) for m in gm.modules())
    calibrate(gm, [(data,)], progress=False)
    path = export_qdq(gm.eval(), (data[:1],), tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp_path / "o.onnx"))).graph.node]
    assert ops.count("QLinearConv") == 2, ops


@settings(max_examples=100, deadline=None)
@given(st.floats(-40.0, 0.0), st.floats(0.0, 700.0))
def test_a_hardswish_input_grid_puts_minus_3_on_a_code_and_covers_the_range(
    lo: float, hi: float
) -> None:
    from edgeslim.quant import QuantSpec
    from edgeslim.quant.integer_gates import ShiftGridActQuant, on_shift_grid

    spec = QuantSpec(bits=8, granularity="tensor", symmetric=False)
    plain, act = ActQuant(spec), ShiftGridActQuant(spec)
    for a in (plain, act):
        a.mode = "observe"
        a(torch.tensor([lo, hi]))
        a.finish_observing()
    p, q = plain.quantizer, act.quantizer
    top = float((255 - p.zero_point) * p.scale)  # what the calibrated grid covered
    zp, scale = int(q.zero_point.item()), float(q.scale.item())
    if not on_shift_grid(q):  # refused: it would have coarsened a range that stops above -3
        assert torch.equal(q.scale, p.scale) and torch.equal(q.zero_point, p.zero_point)
        assert float(p.zero_point * p.scale) < 3.0
        return
    assert 1 <= zp <= 255
    assert np.isclose(zp * scale, 3.0)  # code 0 is -3: hardswish is 0 below it anyway
    assert (255 - zp) * scale >= top - 1e-9  # the calibrated top is still covered
    # and the step is at most one code coarser than the range [-3, top] needs
    assert scale <= (top + 3.0) / 255 * (zp + 1) / zp + 1e-12


def test_hardswish_off_the_shifted_grid_falls_back_to_the_fixed_grid_gate(
    tmp_path: Path,
) -> None:
    """A grid without -3 on a code (moved after calibration, as QAT's learned ranges may)
    makes that gate use the fixed [0, 6] grid again: still no float op, still what torch
    computes."""
    import onnx

    from edgeslim.quant.integer_gates import ShiftGridActQuant

    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    gm = _quantized(_SE(gain=4.0), data)
    aligned = [m for m in gm.modules() if isinstance(m, ShiftGridActQuant)]
    gates = [m for m in gm.modules() if isinstance(m, IntegerHardswish)]
    assert len(aligned) == 2 and all(g.on_codes for g in gates)
    aligned[0].quantizer.set_range(-2.5, 4.0)  # no longer has -3 on a code
    assert sum(g.on_codes for g in gates) == 1
    path = export_qdq(gm, (data[:1],), tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp_path / "o.onnx"))).graph.node]
    assert "HardSwish" not in ops and "Mul" not in ops and "DequantizeLinear" not in ops, ops
    assert ops.count("Clip") == 1 and ops.count("QLinearAdd") == 1, ops
    sess = ort_session(path)
    with torch.no_grad():
        expected = gm(data[:4]).numpy()
    got = np.concatenate([sess.run(None, {"input": data[i : i + 1].numpy()})[0] for i in range(4)])
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-12.0, 12.0, allow_nan=False, width=32), min_size=1, max_size=64))
def test_integer_silu_is_within_half_a_gate_step(values: list[float]) -> None:
    from edgeslim.quant.integer_gates import IntegerSiLU

    x = torch.tensor(values)
    got = IntegerSiLU()(x)
    assert torch.all((got - nn.functional.silu(x)).abs() <= x.abs() * (STEP / 2 + 1e-6) + 1e-6)


def test_silu_runs_as_qlinear_sigmoid_and_mul(int8: Any, tmp_path: Path) -> None:
    """``nn.SiLU`` and ``F.silu`` between convs: no float op in ONNX Runtime's graph."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.act, self.head = nn.SiLU(), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(nn.functional.silu(self.b(self.act(self.a(x)))))

    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    _, ops = int8.export(int8.quantize(Net(), data), data, tmp_path)
    assert ops.count("QLinearSigmoid") == 2 and ops.count("QLinearMul") == 2, ops
    assert not {"Sigmoid", "Mul"} & set(ops) and ops.count("DequantizeLinear") == 1, ops
