"""Residual branches found on the graph: which adds are a block's branch, which are not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.graph.branches import residual_branches
from edgeslim.zoo import load_zoo_model


def test_resnet20_has_one_branch_per_block_and_keeps_conv_shortcuts() -> None:
    model = load_zoo_model("resnet20").eval()
    branches = residual_branches(model, (torch.zeros(1, 1, 28, 28),))
    assert [b.name for b in branches] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    first_of_stage = next(b for b in branches if b.name == "layer2.0")
    # the 1x1 conv shortcut beside it is the part that stays, not the branch
    assert first_of_stage.last == "layer2.0.bn2"
    assert first_of_stage.body == ("layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2")
    assert all(b.channel_dim == 1 and b.rank == 4 for b in branches)


class _MLPBlock(nn.Module):
    """Pre-norm transformer MLP: ``x + fc2(gelu(fc1(norm(x))))`` on (batch, tokens, dim)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 16), nn.Linear(16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def test_a_token_mlp_branch_keeps_its_last_axis() -> None:
    (branch,) = residual_branches(_MLPBlock(), (torch.zeros(1, 5, 8),))
    assert (branch.last, branch.channel_dim, branch.rank) == ("fc2", -1, 3)
    assert branch.body == ("norm", "fc1")


class _Shared(nn.Module):
    """The branch's conv is also used outside it: removing the branch would remove it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.conv(x))


class _Tapped(nn.Module):
    """The branch's inner activation is read outside it (a second output)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return x + self.b(h), h


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + 1.0


def test_adds_that_are_not_removable_branches_are_left() -> None:
    x = (torch.zeros(1, 4, 6, 6),)
    assert residual_branches(_Shared(), x) == []
    assert residual_branches(_Tapped(), x) == []
    assert residual_branches(_Plain(), x) == []  # an add of a constant is no branch


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 1.0:  # reads tensor values: fx cannot trace it
            return x + self.a(x)
        return x


def test_an_untraceable_model_is_refused_naming_the_line_not_found_empty() -> None:
    from edgeslim.errors import TraceError

    with pytest.raises(TraceError, match=r"x\.abs\(\)\.max\(\)"):
        residual_branches(_Branchy(), (torch.zeros(1, 4, 6, 6),))


class _PreNormBlock(nn.Module):
    """A ViT block: two residual branches in one module's forward."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(d), nn.Linear(d, d)
        self.n2, self.f1, self.f2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.f2(torch.relu(self.f1(self.n2(x))))


def test_two_branches_of_one_block_get_names_of_their_own() -> None:
    """Both were named `1` (their common parent): the prune stage removed the small one
    where the large one was chosen, and search removed both under one key."""
    from edgeslim.prune.depth import depth_prune_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _PreNormBlock(), nn.Linear(8, 3)).eval()
    x = torch.randn(1, 5, 4)
    branches = residual_branches(model, (x,))
    assert [b.name for b in branches] == ["1.attn", "1.f2"]
    assert {b.name: b.modules for b in branches}["1.f2"] == ("1.n2", "1.f1", "1.f2")
    _, removed, _ = depth_prune_(model, (x,), [(torch.randn(16, 5, 4),)], 0.5)
    assert removed == ["1.f2"]  # the MLP alone, the attention kept
    assert isinstance(model[1].attn, nn.Linear) and not isinstance(model[1].f2, nn.Linear)
