"""Statistics through channel splits, slices and shuffles (ShuffleNet, Ghost modules)."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.datafree.chain import analyze, input_stats
from edgeslim.datafree.gaussian import RELU, act_mean


class SplitShuffle(nn.Module):
    """conv -> BN -> ReLU, then a ShuffleNet unit's split and shuffle and a Ghost slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.right = nn.Conv2d(4, 4, 1)
        self.shuffled = nn.Conv2d(8, 4, 1)
        self.sliced = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.bn.bias.copy_(torch.linspace(-1.0, 2.5, 8))  # a distinct mean per channel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn(self.conv(x)))
        _, right = h.chunk(2, dim=1)
        n, c, hh, ww = h.shape
        shuffled = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, c, hh, ww)
        return self.right(right), self.shuffled(shuffled), self.sliced(h[:, 5:])


def test_split_slice_and_shuffle_carry_each_channel_s_statistics() -> None:
    chain = analyze(SplitShuffle().eval(), torch.zeros(1, 3, 8, 8))
    pre = chain.bn_outputs["conv"]
    relu_mean = act_mean(pre.mean, pre.std, RELU)
    perm = torch.arange(8).view(2, 4).t().reshape(-1)  # the shuffle's channel order
    for fqn, channels in (("right", torch.arange(4, 8)), ("shuffled", perm),
                          ("sliced", torch.arange(5, 8))):  # fmt: skip
        got = input_stats(chain, fqn)
        assert got is not None, fqn  # unknown before: these layers kept float inputs
        torch.testing.assert_close(got.mean, relu_mean[channels])


class Reused(nn.Module):
    """One conv applied twice, each call with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn_a(self.conv(x)))
        x = torch.relu(self.bn_b(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_a_module_called_twice_is_no_pair() -> None:
    """DF-MPC made a reused conv its own compensator (the note read 'conv: 3 bits, compensated
    in conv'): a change for one call reaches the other. Neither end of a pair now."""
    chain = analyze(Reused().eval(), torch.zeros(1, 3, 8, 8))
    assert not chain.pairs
    assert "called at 2 places" in chain.blocked["conv"].reason
    assert "called at 2 places" in chain.blocked["stem"].reason
