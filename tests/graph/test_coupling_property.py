"""Property test: coupling groups are complete on randomly wired conv nets.

Hypothesis builds nets from plain convs, residual adds, concatenations, depthwise and
grouped convs and BatchNorm, ending in a flatten or a pooled linear head; every prunable
group must pass the cut-and-scramble check of ``coupling_check``.
"""

from __future__ import annotations

import torch
from coupling_check import check_group
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.graph import analyze


class Block(nn.Module):
    def __init__(self, kind: str, ch: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.conv = nn.Conv2d(ch, width, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            self.out_ch = width
        elif kind == "residual":
            self.conv1 = nn.Conv2d(ch, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, ch, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(ch)
            self.out_ch = ch
        elif kind == "concat":
            self.conv = nn.Conv2d(ch, width, 1, bias=True)
            self.out_ch = ch + width
        else:  # depthwise, or grouped: the most groups of at least two channels
            groups = ch if kind == "depthwise" else max(g for g in range(1, ch) if ch % g == 0)
            self.dw = nn.Conv2d(ch, ch, 3, padding=1, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(ch)
            self.out_ch = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return torch.relu(self.bn(self.conv(x)))
        if self.kind == "residual":
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        if self.kind == "concat":
            return torch.cat([x, torch.relu(self.conv(x))], 1)
        return torch.relu(self.bn(self.dw(x)))


class RandomNet(nn.Module):
    def __init__(self, kinds: list[str], widths: list[int], flatten_head: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        ch = 4
        blocks = []
        for kind, width in zip(kinds, widths, strict=False):
            blocks.append(Block(kind, ch, width))
            ch = blocks[-1].out_ch
        self.blocks = nn.Sequential(*blocks)
        self.flatten_head = flatten_head
        self.head = nn.Linear(ch * 4 * 4 if flatten_head else ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        if self.flatten_head:
            return self.head(torch.flatten(nn.functional.max_pool2d(x, 2), 1))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(
        st.sampled_from(["conv", "residual", "concat", "depthwise", "grouped"]),
        min_size=1,
        max_size=5,
    ),
    widths=st.lists(st.integers(2, 6), min_size=5, max_size=5),
    flatten_head=st.booleans(),
    seed=st.integers(0, 1000),
)
# the stem's channels and a concatenated conv's reach a grouped conv whose groups of 3 straddle
# the two tensors: nothing is prunable, and the reason must say so
@example(kinds=["depthwise", "depthwise", "concat", "grouped"], widths=[2, 2, 5, 2, 2],
         flatten_head=False, seed=0)  # fmt: skip
def test_random_nets_have_complete_groups(
    kinds: list[str], widths: list[int], flatten_head: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = RandomNet(kinds, widths, flatten_head).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 1, 8, 8)
    graph = analyze(model, x)
    if not graph.prunable_groups:
        # nothing prunable only when a grouped conv's groups straddle a concatenation it reads
        # (the stem, a residual block's inner width and a concat's conv are prunable otherwise)
        reasons = [g.reason for g in graph.groups]
        assert "grouped" in kinds and "concat" in kinds, reasons
        assert any("straddle the concatenated tensors" in r for r in reasons), reasons
    for group in graph.prunable_groups:
        check_group(model, group, (x,))
