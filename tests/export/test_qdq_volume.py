"""Video and volumetric models' pools run on integers in the int8 export.

A video network pools over time and space: ``MaxPool3d``, ``AvgPool3d``,
``AdaptiveAvgPool3d(1)`` or a hand-written ``x.mean((2, 3, 4))`` (a squeeze-excite block, a
head). The edge pass quantizes them as it does the 1-D and 2-D pools, and ONNX Runtime's
selectors fuse ``DQ -> pool -> Q`` at any rank. Before, the edge pass left them out: the max
pool ran in float between dequantize and quantize nodes, and a mean stayed a float
``ReduceMean`` with the residual add after it (an average pool between two quantized convs
was already integer, by its neighbours' quantizers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from edgeslim.graph.ops import is_spatial_mean
from edgeslim.runtime.kernels import kernel_coverage


class _Video(nn.Module):
    """conv -> 3-D max pool -> conv -> 3-D average pool -> squeeze-excite over
    ``mean((2, 3, 4))`` -> residual add -> global pool head (a mean, or the module)."""

    def __init__(self, module_head: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.conv2 = nn.Conv3d(8, 16, 3, padding=1)
        self.pool2 = nn.AvgPool3d(2)
        self.conv3 = nn.Conv3d(16, 16, 1)
        self.squeeze = nn.Conv3d(16, 4, 1)
        self.excite = nn.Conv3d(4, 16, 1)
        self.head = nn.AdaptiveAvgPool3d(1) if module_head else None
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        h = self.conv3(x)
        s = torch.relu(self.squeeze(h.mean((2, 3, 4), keepdim=True)))
        x = x + h * torch.sigmoid(self.excite(s))
        if self.head is not None:
            return self.fc(torch.flatten(self.head(x), 1))
        return self.fc(x.mean((2, 3, 4)))


def test_means_over_the_axes_after_the_channels_are_pools() -> None:
    class Means(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pools = x.mean((2, 3, 4)) + x.mean((-3, -2, -1)) + x.mean((3, 4)).sum(2)
            others = x.mean((1, 2)) + x.mean(-1).sum(1) + x.mean((-4, -1)) + x.mean(2).sum(1)
            return pools.sum() + others.sum()

    gm = torch.fx.symbolic_trace(Means())
    found = [n.args[1] for n in gm.graph.nodes if is_spatial_mean(n)]
    assert found == [(2, 3, 4), (-3, -2, -1), (3, 4)]


@pytest.mark.parametrize("module_head", [False, True])
def test_3d_pools_run_on_integers(module_head: bool, int8: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.randn(24, 3, 4, 12, 12)
    gm = int8.quantize(_Video(module_head).eval(), data)
    written, ops = int8.export(gm, data, tmp_path)  # also: ORT computes what torch does
    assert "ReduceMean" not in written, written
    assert written.count("GlobalAveragePool") == 2, written  # the SE mean and the head
    assert ops.count("QLinearGlobalAveragePool") == 2, ops
    assert "QLinearAveragePool" in ops and "QLinearMul" in ops and "QLinearAdd" in ops, ops
    float_ops = {"ReduceMean", "Mul", "Add", "AveragePool", "GlobalAveragePool"}
    assert not float_ops & set(ops), ops
    # the max pool reads a QLinearConv's codes, not a dequantized tensor (the files are the
    # ones int8.export wrote: the QDQ file and the graph ONNX Runtime optimised from it)
    ran = onnx.load(str(tmp_path / "o.onnx")).graph.node
    producer = {o: n.op_type for n in ran for o in n.output}
    pools = [n for n in ran if n.op_type == "MaxPool"]
    assert len(pools) == 1 and producer[pools[0].input[0]] == "QLinearConv", pools
    coverage = kernel_coverage(tmp_path / "int8.onnx", [data[:1]])
    assert coverage.int8_mac_share > 0.99, coverage.summary()
