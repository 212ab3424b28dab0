"""A ShuffleNetV2 unit runs on integers: channel split, branch, concat, channel shuffle.

``chunk`` halves, ``view``/``transpose``/``reshape`` only rearrange values: one per-tensor
grid serves on both sides of them (both halves of a split share their input's quantizer),
so ONNX Runtime runs them on uint8; the concat gets ``QLinearConcat`` because the shape the
shuffle reads is taken after the quantizer, and ``Shape`` reads the codes, not a
dequantized copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.quant.modules import ActQuant


class _ShuffleUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, torch.relu(self.branch(right))], dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x)


def test_a_shufflenet_unit_runs_on_integers(int8: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    gm = int8.quantize(_ShuffleUnit(), data)
    quantizers = {n.target for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(str(n.target)), ActQuant)}  # fmt: skip
    registered = {n for n, m in gm.named_modules() if isinstance(m, ActQuant)}
    assert quantizers == registered  # the split's second quantizer was merged, not left over
    _, ops = int8.export(gm, data, tmp_path)
    assert "QLinearConcat" in ops and ops.count("QLinearConv") == 3, ops
    assert ops.count("DequantizeLinear") == 1 and ops.count("QuantizeLinear") == 1, ops
