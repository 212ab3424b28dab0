"""Speed-only rewrites of exported graphs compute exactly what torch computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.export.onnx import export_onnx
from edgeslim.runtime.ort import ort_session


class _Prelu(nn.Module):
    def __init__(self, slopes: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(slopes), 3, padding=1)
        self.act = nn.PReLU(len(slopes))
        self.fc = nn.Linear(len(slopes), 4)
        self.act2 = nn.PReLU()
        with torch.no_grad():
            self.act.weight.copy_(slopes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc(self.act(self.conv(x)).mean(dim=(2, 3))))


@pytest.mark.parametrize(
    ("slopes", "op"),
    [
        (torch.tensor([0.0, 0.25, 1.0, -0.5]), "Max"),  # every slope <= 1
        (torch.tensor([1.0, 1.5, 3.0, 2.0]), "Min"),  # every slope >= 1
        (torch.tensor([0.1, 2.0, -1.0, 1.0]), "Where"),  # mixed
    ],
)
def test_prelu_becomes_max_min_or_where_and_stays_exact(
    slopes: torch.Tensor, op: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = _Prelu(slopes).eval()
    x = torch.randn(8, 3, 10, 10)
    path = export_onnx(model, (x[:1],), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "PRelu" not in ops and op in ops
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_drop_dead_removes_unread_chains_and_constants_but_keeps_outputs() -> None:
    from onnx import helper

    from edgeslim.export.rewrite import drop_dead

    model = _graph(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Neg", ["c"], ["dead1"]),  # read by dead2 only
            helper.make_node("Abs", ["dead1"], ["dead2"]),  # read by nothing
        ],
        {"c": np.ones(4, np.float32), "unused": np.zeros(2, np.float32)},
    )
    assert drop_dead(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    assert not model.graph.initializer  # "c" was read by the dead Neg alone


def test_requantize_on_the_same_grid_is_bypassed_and_exact() -> None:
    from onnx import helper

    from edgeslim.export.qdq import bypass_requantize

    s, z = np.array(0.05, np.float32), np.array(100, np.uint8)
    other = np.array(0.04, np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
        helper.make_node("QuantizeLinear", ["d1", "s", "z"], ["q2"]),  # same grid: bypassed
        helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["d2"]),
        helper.make_node("QuantizeLinear", ["d2", "o", "z"], ["q3"]),  # another grid: kept
        helper.make_node("DequantizeLinear", ["q3", "o", "z"], ["y"]),
    ]
    model = _graph(nodes, {"s": s, "z": z, "o": other})
    x = np.linspace(-6, 8, 4).astype(np.float32)
    before = _run(model, x)
    assert bypass_requantize(model) == 1
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 2
    np.testing.assert_array_equal(_run(model, x), before)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"x": x})[0]
    return out


def test_prelus_with_equal_slopes_are_all_rewritten(tmp_path: Path) -> None:
    """The exporter writes the second of two equal slope tensors as ``Identity`` of the
    first; it is still a constant, so that PReLU is rewritten too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8)
    ).eval()  # both slopes at PReLU's initial 0.25
    x = torch.randn(4, 3, 10, 10)
    path = export_onnx(model, (x[:1],), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "PRelu" not in ops and ops.count("Max") == 2, ops
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-6)
