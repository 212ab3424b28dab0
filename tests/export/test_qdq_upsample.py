"""Feature-pyramid necks: nearest upsampling and concatenation run on integers.

Nearest upsampling copies values, so one quantizer serves on both sides of it and ONNX
Runtime runs the ``Resize`` on uint8; a concatenation gets every operand quantized so that it
runs as ``QLinearConcat``. Bilinear upsampling averages: it stays a float ``Resize``
between quantizers, and the result still matches the torch simulation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.export.qdq import export_qdq
from edgeslim.quant import calibrate, quantize_, w8a8
from edgeslim.quant.edges import quantize_edges
from edgeslim.runtime.kernels import optimized_graph
from edgeslim.runtime.ort import ort_session


class _Neck(nn.Module):
    """A coarse branch upsampled and concatenated with a fine one, then a conv."""

    def __init__(self, mode: str, module: bool) -> None:
        super().__init__()
        self.coarse = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fine = nn.Conv2d(3, 8, 3, padding=1)
        self.fuse = nn.Conv2d(16, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode) if module else None
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.relu(self.coarse(x))
        c = self.up(c) if self.up is not None else F.interpolate(c, scale_factor=2, mode=self.mode)
        return self.fuse(torch.cat([c, torch.relu(self.fine(x))], dim=1))


def _export(model: nn.Module, data: torch.Tensor, tmp: Path) -> tuple[list[str], float]:
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    calibrate(gm, [(data,)], progress=False)
    gm.eval()
    path = export_qdq(gm, (data[:1],), tmp / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp / "o.onnx"))).graph.node]
    sess = ort_session(path)
    with torch.no_grad():
        want = gm(data[:4]).numpy()
    got = np.concatenate([sess.run(None, {"input": data[i : i + 1].numpy()})[0] for i in range(4)])
    return ops, float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("module", [False, True], ids=["F.interpolate", "nn.Upsample"])
def test_nearest_upsample_and_concat_run_on_integers(module: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ops, err = _export(_Neck("nearest", module).eval(), torch.randn(32, 3, 12, 12), tmp_path)
    assert "QLinearConcat" in ops and ops.count("Resize") == 1, ops
    assert ops.count("DequantizeLinear") == 1, ops  # the output's alone: Resize runs on uint8
    assert err <= 0.05


def test_bilinear_upsample_stays_float_and_agrees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ops, err = _export(_Neck("bilinear", True).eval(), torch.randn(32, 3, 12, 12), tmp_path)
    assert "QLinearConcat" in ops and ops.count("QLinearConv") == 3, ops
    assert ops.count("DequantizeLinear") == 2, ops  # before the float Resize, and the output
    assert err <= 0.05
