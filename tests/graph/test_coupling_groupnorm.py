"""GroupNorm: its channels are pruned a whole group at a time.

Each of a GroupNorm's groups of ``C / G`` channels has its own mean and variance, so
removing whole groups leaves the others exact, while removing one channel of a group would
change its neighbours' statistics. Checked by meaning: the leak probe scrambles one unit
(a whole group) everywhere but in its consumers, and pruning groups whose consumers read
nothing from them leaves the output unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from coupling_check import check_group
from torch import nn

from edgeslim.errors import PruneError
from edgeslim.graph import analyze
from edgeslim.prune import prune_
from edgeslim.prune.surgery import prune_groups


class GNNet(nn.Module):
    """conv -> GN(4 groups) -> conv -> GN(8) with a residual conv -> GN(8), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn_a = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.gn_b = nn.GroupNorm(8, 16)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.gn_c = nn.GroupNorm(8, 16)
        self.head = nn.Linear(16, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for gn in (self.gn_a, self.gn_b, self.gn_c):
                gn.weight.copy_(0.5 + torch.rand(gn.num_channels, generator=g))
                gn.bias.copy_(0.3 * torch.randn(gn.num_channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn_a(self.a(x)))
        h = torch.relu(self.gn_b(self.b(h)))
        h = h + torch.relu(self.gn_c(self.c(h)))  # two GroupNorms of 2 channels per group
        return self.head(h.mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _group_of(model: nn.Module, producer: str) -> object:
    graph = analyze(model, X[:1])
    (group,) = [g for g in graph.groups if producer in g.producers]
    return group


def test_groupnorm_channels_are_prunable_in_whole_groups() -> None:
    model = GNNet().eval()
    graph = analyze(model, X[:1])
    a = next(g for g in graph.groups if "a" in g.producers)
    bc = next(g for g in graph.groups if "b" in g.producers)
    assert a.prunable and (a.size, a.unit) == (4, 2)
    assert bc.prunable and (bc.size, bc.unit) == (8, 2) and "c" in bc.producers
    assert {m.fqn for m in bc.members if m.role == "bn"} == {"gn_b", "gn_c"}
    for g in (a, bc):
        check_group(model, g, (X,))  # one unit (a whole group) reaches only its consumers


def test_pruning_groups_that_feed_nothing_keeps_the_output() -> None:
    model = GNNet().eval()
    with torch.no_grad():  # groups 1 and 3 of gn_a (channels 2-3, 6-7) are read by nobody
        model.b.weight[:, [2, 3, 6, 7]] = 0
        before = model(X)
    group = _group_of(model, "a")
    pruned = prune_groups(copy.deepcopy(model), {group: [0, 2]})  # type: ignore[dict-item]
    gn = pruned.get_submodule("gn_a")
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (2, 4)
    assert pruned.get_submodule("b").in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), before, atol=1e-5, rtol=1e-5)


def test_prune_by_criterion_keeps_whole_groups_and_runs() -> None:
    model = GNNet().eval()
    pruned, _ = prune_(copy.deepcopy(model), (X[:1],), "l1", ratio=0.5, global_ranking=False)
    for name in ("gn_a", "gn_b", "gn_c"):
        gn = pruned.get_submodule(name)
        assert isinstance(gn, nn.GroupNorm)
        assert gn.num_channels == gn.num_groups * 2  # 2 channels per group, as before
    assert pruned.get_submodule("gn_b").num_channels < 16
    assert pruned(X).shape == (2, 5)


def test_round_to_counts_channels_not_groupnorm_groups() -> None:
    """round_to=4 on groups of 2 channels keeps an even number of GroupNorm groups (it
    would keep every group if it counted groups: 8 of 8 and 4 of 4 are both "multiples")."""
    model = GNNet().eval()
    pruned, _ = prune_(
        copy.deepcopy(model), (X[:1],), "l1", ratio=0.5, global_ranking=False, round_to=4
    )
    widths = [pruned.get_submodule(n).num_channels for n in ("gn_a", "gn_b")]
    assert widths == [4, 8]


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: (nn.GroupNorm(1, 8), nn.GroupNorm(4, 8)), "its one group holds every channel"),
        (lambda: (nn.GroupNorm(2, 8), nn.GroupNorm(4, 8)), "whose groups differ"),
    ],
)
def test_groupnorms_that_cannot_lose_whole_groups_fix_the_channels(build: object, why: str) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p, self.q = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.n1, self.n2 = build()  # type: ignore[operator]
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.n1(self.p(x)) + self.n2(self.q(x)))

    group = _group_of(Two().eval(), "p")
    assert not group.prunable and why in group.reason  # type: ignore[attr-defined]


def test_a_groupnorm_group_straddling_a_concat_fixes_the_channels() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p, self.q = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1)
            self.gn = nn.GroupNorm(2, 8)  # groups of 4 across the 3 + 5 channels
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gn(torch.cat([self.p(x), self.q(x)], 1)))

    group = _group_of(Cat().eval(), "p")
    assert not group.prunable and "straddle" in group.reason  # type: ignore[attr-defined]


def test_surgery_refuses_to_split_a_groupnorm_group() -> None:
    model = GNNet().eval()
    group = _group_of(model, "a")
    broken = type(group)(  # type: ignore[call-arg]
        id=0,
        size=8,
        members=group.members,
        prunable=True,  # type: ignore[attr-defined]
    )
    with pytest.raises(PruneError, match="whole groups"):
        prune_groups(copy.deepcopy(model), {broken: [0, 1, 2]})


class GroupNormAct(nn.GroupNorm):
    """Hugging Face BiT's norm: an ``nn.GroupNorm`` subclass whose own forward calls
    ``F.group_norm`` with its parameters, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(
            nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        )


class SubclassNet(GNNet):
    def __init__(self) -> None:
        super().__init__()
        self.gn_a = GroupNormAct(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn_a(self.a(x))
        h = torch.relu(self.gn_b(self.b(h)))
        return self.head(h.mean((2, 3)))


def test_a_groupnorm_subclass_with_its_own_forward_prunes_a_group_at_a_time() -> None:
    """Its ``F.group_norm`` call was read as a norm over every channel: BiT's groups were
    all fixed ("normalised jointly by `group_norm`")."""
    model = SubclassNet().eval()
    group = _group_of(model, "a")
    assert group.prunable and (group.size, group.unit) == (4, 2)  # type: ignore[attr-defined]
    with torch.no_grad():  # groups 1 and 3 (channels 2-3, 6-7) are read by nobody
        model.b.weight[:, [2, 3, 6, 7]] = 0
        before = model(X)
    pruned = prune_groups(copy.deepcopy(model), {group: [0, 2]})  # type: ignore[dict-item]
    gn = pruned.get_submodule("gn_a")
    assert isinstance(gn, GroupNormAct) and (gn.num_groups, gn.num_channels) == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), before, atol=1e-5, rtol=1e-5)
