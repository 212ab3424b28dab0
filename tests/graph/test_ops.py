"""The shared op tables: each traced form of an op (module, function, method) is matched."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.graph import trace
from edgeslim.graph.ops import ADDS, AVERAGES, MOVES_VALUES


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.conv(x))
        y = nn.functional.avg_pool2d(y, 1) + y
        return self.avg(y).reshape(y.shape[0], -1).contiguous()


def test_op_sets_match_modules_functions_and_methods() -> None:
    gm = trace(Net())
    kinds = {}
    for node in gm.graph.nodes:
        kinds[node.name] = (
            MOVES_VALUES.matches(gm, node), AVERAGES.matches(gm, node),
            node.op == "call_function" and node.target in ADDS,
        )  # fmt: skip
    assert kinds["conv"] == (False, False, False)
    assert kinds["pool"] == (True, False, False)
    assert kinds["avg_pool2d"] == (False, True, False)
    assert kinds["add"] == (False, False, True)
    assert kinds["avg"] == (False, True, False)
    assert kinds["reshape"][0] and kinds["contiguous"][0]
    both = MOVES_VALUES | AVERAGES
    assert all(
        both.matches(gm, n) == (k[0] or k[1])
        for n, k in zip(gm.graph.nodes, kinds.values(), strict=True)
    )
