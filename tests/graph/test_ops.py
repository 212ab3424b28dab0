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


class _MyPad(nn.ZeroPad2d):
    """A user's subclass (fx traces into it: not a torch.nn leaf)."""


def test_padding_reads_mode_value_dims_and_whether_channels_are_padded() -> None:
    from torch.nn import functional as F

    from edgeslim.graph.ops import padding

    class Pads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zero, self.mine = nn.ZeroPad2d(1), _MyPad((0, 1, 0, 1))
            self.const, self.refl = nn.ConstantPad1d(2, 0.5), nn.ReflectionPad2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.refl(self.mine(self.zero(x)))
            y = F.pad(y, (1, 1, 1, 1), mode="replicate") + 1
            z = self.const(y.flatten(2))
            return F.pad(z, (0, 0, 0, 1)).sum() + F.pad(x, (0, 0, 0, 0, 0, 1)).sum()

    gm = trace(Pads())
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(1, 3, 6, 6))
    found = {n.name: padding(gm, n) for n in gm.graph.nodes}
    assert found["zero"] is not None and found["zero"].zero and found["zero"].spatial
    refl = found["refl"]
    assert refl is not None and refl.mode == "reflect" and refl.homogeneous and not refl.zero
    const = found["const"]
    assert const is not None and const.value == 0.5 and not const.homogeneous
    pads = [p for name, p in found.items() if name.startswith("pad")]
    assert [(p.mode, p.dims, p.spatial) for p in pads if p is not None] == [
        ("constant", 2, True),  # the subclass: fx traces into it, to F.pad
        ("replicate", 2, True),  # the last two dims of a 4-D tensor
        ("constant", 2, False),  # a 3-D tensor's last two dims: the channel axis too
        ("constant", 3, False),  # 4-D, three dims: the channel axis
    ]
    assert found["add"] is None
