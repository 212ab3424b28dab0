"""Grouped convs (ResNeXt, RegNet): pruned a whole conv group at a time.

A conv whose ``G`` groups each map ``C / G`` channels to as many reads and writes the same
channel range per group, so removing a whole group removes its input and its output
channels together and leaves every other group's output exact. The pruned model must run,
cost what its new shapes say, and equal the original with those groups switched off.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from edgeslim.cost.lut import layer_key
from edgeslim.errors import PruneError
from edgeslim.graph import analyze, layer_table
from edgeslim.prune import load_pruned, prune_, prune_groups, save_pruned


class Bottleneck(nn.Module):
    """ResNeXt's unit: 1x1 reduce, grouped 3x3 (``groups`` of ``width / groups``), 1x1
    expand, residual add; ``norm`` builds the grouped conv's norm (BatchNorm by default)."""

    def __init__(
        self, c: int = 32, width: int = 24, groups: int = 6, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, width, 1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.b2 = norm if norm is not None else nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, c, 1, bias=False)
        self.b3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)))
        return torch.relu(x + self.b3(self.c3(h)))


def resnext(norm: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Bottleneck(norm=norm), Bottleneck(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for m in model.modules():  # non-trivial statistics, so switched-off groups matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear MACs from each layer's own shapes (``out * cin/groups * k``)."""
    total = 0

    def hook(m: nn.Module, inp: object, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_grouped_conv_joins_its_reduce_and_expand_in_whole_groups() -> None:
    graph = analyze(resnext(), X)
    group = next(g for g in graph.groups if "2.c1" in g.producers)
    assert group.prunable, group.reason
    assert (group.size, group.unit) == (6, 4)  # six conv groups of four channels
    roles = {m.fqn: m.role for m in group.members}
    assert roles == {"2.c1": "out", "2.b1": "bn", "2.c2": "depthwise", "2.b2": "bn",
                     "2.c3": "in"}  # fmt: skip


def _switch_off(model: nn.Module, kept: torch.Tensor, size: int, names: list[str]) -> None:
    off = torch.ones(size, dtype=torch.bool)
    off[kept] = False
    for name in names:
        layer = model.get_submodule(name)
        layer.weight.data[off] = 0.0
        layer.bias.data[off] = 0.0


def test_pruned_grouped_conv_loses_whole_groups_and_equals_them_switched_off() -> None:
    model = resnext()
    # the stem's residual stream skipped: the MACs come out of the conv groups alone
    pruned, plan = prune_(copy.deepcopy(model), (X,), "l1", macs_reduction=0.3, skip=["0"])
    for name in ("2", "3"):
        conv = pruned.get_submodule(f"{name}.c2")
        assert conv.in_channels == conv.out_channels
        assert conv.in_channels // conv.groups == 4  # channels per group unchanged
    lost = [n for n in ("2", "3") if pruned.get_submodule(f"{n}.c2").groups < 6]
    assert lost, "the 30% cut removed no conv group"
    assert conv_macs(pruned, X) <= 0.74 * conv_macs(model, X)  # within 2 points short
    assert layer_table(pruned, X)  # the layer table reads the new shapes
    switched = copy.deepcopy(model)  # every removed channel made to output zero
    for n in ("2", "3"):
        kept = torch.tensor(plan.keep.get(f"{n}.c1", range(6)))
        channels = (kept[:, None] * 4 + torch.arange(4)).flatten()
        _switch_off(switched, channels, 24, [f"{n}.b1", f"{n}.b2"])
    stem = torch.tensor(plan.keep.get("0", range(32)))
    _switch_off(switched, stem, 32, ["0", "2.b3", "3.b3"])
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), switched(X), atol=1e-5, rtol=1e-5)


def test_pruned_grouped_conv_saves_reloads_and_keys_its_latency(tmp_path) -> None:
    model = resnext()
    pruned, plan = prune_(copy.deepcopy(model), (X,), "l1", macs_reduction=0.3)
    save_pruned(pruned, plan, tmp_path / "m")
    again = load_pruned(resnext(), tmp_path / "m", (X,))
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X))
    rows = layer_table(pruned, X)
    for n in ("2", "3"):  # the unpruned module's geometry with the pruned shapes
        key = layer_key(model.get_submodule(f"{n}.c2"), rows[f"{n}.c2"], "fp32")
        assert key is not None and key.groups == pruned.get_submodule(f"{n}.c2").groups


def test_group_norm_agreeing_with_the_conv_groups_keeps_them_prunable() -> None:
    graph = analyze(resnext(nn.GroupNorm(6, 24)), X)
    group = next(g for g in graph.groups if "2.c1" in g.producers)
    assert group.prunable and group.unit == 4
    pruned, _ = prune_(resnext(nn.GroupNorm(6, 24)), (X,), "l1", macs_reduction=0.3)
    norm, conv = pruned.get_submodule("2.b2"), pruned.get_submodule("2.c2")
    assert norm.num_groups == conv.groups and norm.num_channels == conv.out_channels


def test_group_norm_splitting_the_conv_groups_differently_is_named() -> None:
    graph = analyze(resnext(nn.GroupNorm(12, 24)), X)  # groups of 2 against the conv's 4
    group = next(g for g in graph.groups if "2.c1" in g.producers)
    assert not group.prunable
    assert "whose groups differ" in group.reason and "grouped conv" in group.reason


@pytest.mark.parametrize("out_channels", [48, 12])
def test_grouped_conv_that_changes_width_is_named(out_channels: int) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 24, 1), nn.ReLU(), nn.Conv2d(24, out_channels, 3, groups=6),
        nn.ReLU(), nn.Conv2d(out_channels, 8, 1),
    ).eval()  # fmt: skip
    graph = analyze(model, X)
    group = next(g for g in graph.groups if "0" in g.producers)
    assert not group.prunable
    assert "keep their width" in group.reason and "`2`" in group.reason


@pytest.mark.parametrize("groups", [4, 16])  # 4 channels per group; depthwise
def test_grouped_transposed_conv_is_a_named_refusal(groups: int) -> None:
    """A grouped ConvTranspose (weight ``(in, out / G, k, k)``) was marked prunable and
    crashed the surgery; it is left whole, named."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 16, 2, stride=2, groups=groups), nn.ReLU(), nn.Conv2d(16, 2, 1),
    ).eval()  # fmt: skip
    group = next(g for g in analyze(model, X).groups if "0" in g.producers)
    assert not group.prunable and "grouped transposed conv `2`" in group.reason


# --- MACs targets with coarse steps: met, or refused naming the finest step ---------------


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResidualGroups(nn.Module):
    """One 32-channel residual stream read and written by convs of 4 groups: the only group
    goes 8 channels (about 25 points of the MACs) at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 32, 3, 2)
        self.g1 = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        )
        self.g2 = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.g1(x))
        x = torch.relu(x + self.g2(x))
        return self.fc(x.mean((2, 3)))


class ConcatGroups(nn.Module):
    """Two 16-channel branches concatenated into a conv of 4 groups (each branch goes 8
    channels at a time), then a fine 24-channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.pa, self.pb = _cbr(3, 16), _cbr(3, 16)
        self.gc = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.out = _cbr(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.gc(torch.cat([self.pa(x), self.pb(x)], 1))))
        return self.fc(self.out(y).mean((2, 3)))


def _reduction(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    return 1 - analyze(pruned, x).macs / analyze(model, x).macs


def test_a_target_only_coarse_steps_pass_is_refused_naming_the_finest_step() -> None:
    torch.manual_seed(32)
    model, x = ResidualGroups().eval(), torch.randn(1, 3, 32, 32)
    with pytest.raises(PruneError, match=r"removes 50\.0% .*finest step.*25\.0%") as info:
        prune_(copy.deepcopy(model), (x,), "l1", macs_reduction=0.3)
    assert "allow_target_miss=True" in str(info.value)
    kept, _ = prune_(copy.deepcopy(model), (x,), "l1", macs_reduction=0.3, allow_target_miss=True)
    assert _reduction(model, kept, x) == pytest.approx(0.5, abs=0.01)  # kept when asked


def test_a_coarse_step_taken_first_lets_the_fine_steps_land_on_the_target() -> None:
    torch.manual_seed(9)
    model, x = ConcatGroups().eval(), torch.randn(1, 3, 32, 32)
    pruned, _ = prune_(copy.deepcopy(model), (x,), "l1", macs_reduction=0.3)
    assert 0.3 - 1e-6 <= _reduction(model, pruned, x) <= 0.31 + 1e-6  # was 37.8%


def test_a_uniform_ratio_past_the_target_is_refused() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        _cbr(3, 32), Bottleneck(32, 32, 2), Bottleneck(32, 32, 2), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(PruneError, match="global_ranking=True"):
        prune_(copy.deepcopy(model), (x,), "l1", macs_reduction=0.3, global_ranking=False)


def test_errors_count_a_grouped_convs_kept_indices_in_blocks() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(32, 16, 1),
    ).eval()  # fmt: skip
    group = next(g for g in analyze(model, torch.randn(1, 3, 8, 8)).groups if g.unit > 1)
    with pytest.raises(
        PruneError, match=r"\(32 channels in 8 blocks of 4\) is out of range 0\.\.7"
    ):
        prune_groups(model, {group: [8]})
    with pytest.raises(PruneError, match="cannot keep zero blocks"):
        prune_groups(model, {group: []})
