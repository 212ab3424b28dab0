"""A clamp at 0 after a conv folds into the quantizer like a ReLU: no float pass left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from torch import nn

from edgeslim.export.qdq import export_qdq
from edgeslim.graph.ops import clamp_bounds
from edgeslim.quant import calibrate, quantize_, w8a8
from edgeslim.quant.edges import quantize_edges
from edgeslim.runtime.kernels import optimized_graph
from edgeslim.runtime.ort import ort_session

F = nn.functional
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x.clamp(0, 6)": lambda x: x.clamp(0, 6),
    "x.clamp(min=0)": lambda x: x.clamp(min=0),
    "torch.clamp(x, 0.0, 6.0)": lambda x: torch.clamp(x, 0.0, 6.0),
    "F.hardtanh(x, 0, 6)": lambda x: F.hardtanh(x, 0.0, 6.0),
    "nn.Hardtanh(0, 6)": nn.Hardtanh(0.0, 6.0),
}


class _Net(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x) * 1.0))


def test_clamp_bounds_reads_every_spelling() -> None:
    gm = fx.symbolic_trace(_Net(ACTS["x.clamp(min=0)"]))
    found = [clamp_bounds(gm, n) for n in gm.graph.nodes if n.op != "placeholder"]
    assert (0.0, None) in found and found.count(None) >= 3  # convs, mul, output: not clamps
    gm = fx.symbolic_trace(_Net(ACTS["nn.Hardtanh(0, 6)"]))
    assert (0.0, 6.0) in [clamp_bounds(gm, n) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", list(ACTS))
def test_a_clamp_at_zero_after_a_conv_leaves_no_float_op(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.Conv2d(8, 4, 1))
    act = ACTS[name]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = model[0], model[2]
            self.act = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)))

    data = torch.randn(32, 3, 10, 10) * 2
    net = Net().eval()
    quantize_(net, w8a8())
    gm = quantize_edges(net)
    calibrate(gm, [(data,)], progress=False)
    gm.eval()
    path = export_qdq(gm, (data[:1],), tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp_path / "o.onnx"))).graph.node]
    assert ops.count("QLinearConv") == 2 and "Clip" not in ops, ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    sess = ort_session(path)
    with torch.no_grad():
        want = gm(data[:4]).numpy()
    got = np.concatenate([sess.run(None, {"input": data[i : i + 1].numpy()})[0] for i in range(4)])
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
