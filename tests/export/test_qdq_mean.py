"""A global average pool written as ``mean`` over the spatial axes runs on integers.

Squeeze-excite blocks and classifier heads are often written ``x.mean((2, 3))`` rather than
with a pooling module. The edge pass quantizes its input like a pool's, and export turns
the ``ReduceMean`` into ``GlobalAveragePool`` (ONNX Runtime has an integer kernel for that
one only), so the squeeze-excite product and the residual add around it stay integer too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.quant.edges import is_spatial_mean
from edgeslim.quant.modules import ActQuant


class _MeanSE(nn.Module):
    """conv -> squeeze-excite (``mean`` keepdim) -> residual add -> ``mean`` head."""

    def __init__(self, keepdim_head: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 5)
        self.keepdim_head = keepdim_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        h = self.conv2(x)
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        x = x + h * gate
        if self.keepdim_head:
            return self.fc(torch.flatten(torch.mean(x, dim=(-2, -1), keepdim=True), 1))
        return self.fc(x.mean((2, 3)))


def test_only_means_over_the_two_spatial_axes_are_pools() -> None:
    class Means(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3)) + x.mean(dim=(-1, -2)).mean(1, keepdim=True) + x.mean(3).sum(2)

    gm = torch.fx.symbolic_trace(Means())
    found = [n.args[1] if len(n.args) > 1 else n.kwargs["dim"] for n in gm.graph.nodes
             if is_spatial_mean(n)]  # fmt: skip
    assert found == [(2, 3), (-1, -2)]


@pytest.mark.parametrize("keepdim_head", [False, True])
def test_spatial_means_run_as_integer_pools(keepdim_head: bool, int8: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    gm = int8.quantize(_MeanSE(keepdim_head), data)
    means = [n for n in gm.graph.nodes if is_spatial_mean(n)]
    assert len(means) == 2
    for n in means:  # the input of each is quantized, as an average pool's is
        src = n.all_input_nodes[0]
        assert src.op == "call_module" and isinstance(gm.get_submodule(str(src.target)), ActQuant)
    written, ops = int8.export(gm, data, tmp_path)
    assert "ReduceMean" not in written and written.count("GlobalAveragePool") == 2, written
    assert ops.count("QLinearGlobalAveragePool") == 2, ops
    # the squeeze-excite product and the residual add around the pool stay integer
    assert "QLinearMul" in ops and "QLinearAdd" in ops, ops
    assert not {"ReduceMean", "Mul", "Add"} & set(ops), ops


def test_a_mean_over_the_last_two_axes_of_a_3d_tensor_stays_reduce_mean(
    int8: Any, tmp_path: Path
) -> None:
    """Not a spatial pool (rank 3): ``ReduceMean`` stays, on a quantized input, and ONNX
    Runtime still computes what torch does."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, 8)
            return self.head(torch.relu(self.fc(x)).mean((-2, -1)).unsqueeze(1))

    torch.manual_seed(0)
    data = torch.randn(16, 5, 8)
    written, _ = int8.export(int8.quantize(Seq(), data), data, tmp_path)
    assert "ReduceMean" in written
