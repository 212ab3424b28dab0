"""The planner: MACs targets hit on the real pruned model, widths rounded, nothing unsafe cut."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches
from edgeslim.data.batching import augmented_batches
from edgeslim.errors import PruneError
from edgeslim.graph import analyze, example_input, layer_table, total_macs
from edgeslim.prune import apply_plan, prune_groups
from edgeslim.prune.planner import (
    MacModel,
    PruneWarning,
    build_importance,
    measure_plan,
    plan_keep,
    plan_pruning,
    prune_,
)
from edgeslim.zoo import load_zoo_model
from edgeslim.zoo.torchvision_style import TinyDenseNet

X = example_input((1, 1, 28, 28))


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {n: load_zoo_model(n) for n in ("resnet20", "mobilenetv2-small", "vgg-small")}


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2-small"])
@pytest.mark.parametrize(("target", "round_to"), [(0.3, 1), (0.5, 8), (0.7, 8)])
def test_global_ranking_hits_the_macs_target(
    models: dict[str, nn.Module], name: str, target: float, round_to: int
) -> None:
    model = models[name]
    keep, stats = plan_keep(model, (X,), "l1", macs_reduction=target, round_to=round_to)
    assert target <= stats.macs_reduction <= target + 0.02
    for key, kept in stats.kept.items():
        size = stats.sizes[key]
        assert kept == size or kept % round_to == 0, (key, kept)
        assert kept >= 0.1 * size  # max_group_ratio 0.9
    pruned = prune_groups(copy.deepcopy(model), keep)
    assert total_macs(layer_table(pruned, X)) == stats.macs  # measured, not estimated


class _ShuffleUnits(nn.Module):
    """ShuffleNet-v2 units (split, branch, concat, channel shuffle) on 24 channels: their
    coupled groups are few and each channel step moves the MACs by about 2.3 points."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU()
        )
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(12, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                nn.Conv2d(12, 12, 3, 1, 1, groups=12, bias=False), nn.BatchNorm2d(12),
                nn.Conv2d(12, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            )
            for _ in range(2)
        )  # fmt: skip
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, branch(b)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


def test_coarse_steps_stop_short_of_the_target_rather_than_far_past_it() -> None:
    """When every step left passes the target by more than 2 points, a stop within 2
    points short of it is taken instead (the prune stage accepts either side; it failed
    on -32.1% for -30%)."""
    torch.manual_seed(0)
    model = _ShuffleUnits().eval()
    x = torch.randn(1, 3, 32, 32)
    keep, stats = plan_keep(model, (x,), "l1", macs_reduction=0.3)
    assert abs(stats.macs_reduction - 0.3) <= 0.02, stats.macs_reduction
    pruned = prune_groups(copy.deepcopy(model), keep)
    assert total_macs(layer_table(pruned, x)) == stats.macs


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2-small", "vgg-small", "densenet"])
def test_mac_model_is_exact(models: dict[str, nn.Module], name: str) -> None:
    """The analytic count equals the layer table of the pruned model, concat included."""
    model, x = (TinyDenseNet().eval(), example_input((1, 1, 16, 16)))
    if name != "densenet":
        model, x = models[name], X
    graph = analyze(model, x)
    groups = graph.prunable_groups
    macs = MacModel(model, graph, groups)
    rng = random.Random(0)
    for _ in range(3):
        removed = [rng.randint(0, g.size - 1) for g in groups]
        keep = {g: list(range(g.size - r)) for g, r in zip(groups, removed, strict=True) if r}
        assert macs.macs(removed) == measure_plan(model, (x,), keep).macs


def test_uniform_ratio_and_uniform_target(models: dict[str, nn.Module]) -> None:
    model = models["vgg-small"]
    _, stats = plan_keep(model, (X,), "l2", ratio=0.25, global_ranking=False)
    assert all(stats.kept[k] == stats.sizes[k] - stats.sizes[k] // 4 for k in stats.kept)
    _, stats = plan_keep(model, (X,), "fpgm", macs_reduction=0.4, global_ranking=False)
    assert 0.4 <= stats.macs_reduction <= 0.42
    fractions = {round(stats.kept[k] / stats.sizes[k], 1) for k in stats.kept}
    assert len(fractions) == 1  # the same ratio everywhere


def test_per_layer_ratio_dict(models: dict[str, nn.Module]) -> None:
    model = models["resnet20"]
    ratio = {"layer1.0.conv1": 0.5, "layer3.*": 0.25}
    _, stats = plan_keep(model, (X,), "l1", ratio=ratio, global_ranking=False, round_to=4)
    assert stats.kept["layer1.0.conv1"] == 8
    layer3 = {k: v for k, v in stats.kept.items() if k.startswith("layer3.")}
    assert len(layer3) == 4 and set(layer3.values()) == {48}
    assert set(stats.kept) == {"layer1.0.conv1", *layer3}  # unlisted groups stay whole
    with pytest.raises(PruneError, match=r"'layer9\.conv1' is not a prunable group"):
        plan_keep(model, (X,), "l1", ratio={"layer9.conv1": 0.5})


def test_plan_replays_and_prune_applies_in_place(models: dict[str, nn.Module]) -> None:
    model = models["resnet20"]
    plan = plan_pruning(model, (X,), "l1", macs_reduction=0.5, round_to=8)
    assert all(len(v) % 8 == 0 for v in plan.keep.values())
    replayed = apply_plan(copy.deepcopy(model), plan, (X,))
    pruned, plan2 = prune_(copy.deepcopy(model), (X,), "l1", macs_reduction=0.5, round_to=8)
    assert plan2.keep == plan.keep
    torch.testing.assert_close(replayed(X), pruned(X))
    base = total_macs(layer_table(model, X))
    assert total_macs(layer_table(pruned, X)) <= 0.5 * base


def test_skip_leaves_the_named_layers_whole(models: dict[str, nn.Module]) -> None:
    model = models["resnet20"]
    _, stats = plan_keep(model, (X,), "l1", macs_reduction=0.3, skip=["layer3.*", "conv1"])
    assert not any(k.startswith("layer3.") or k == "conv1" for k in stats.kept)
    assert stats.macs_reduction >= 0.3
    with pytest.raises(PruneError, match=r"no layer 'layer7\.conv1'"):
        plan_keep(model, (X,), "l1", macs_reduction=0.3, skip=["layer7.conv1"])


class Rolled(nn.Module):
    """conv1's channels go through ``torch.roll`` (mixes channels): not safe to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.roll(torch.relu(self.conv1(x)), 1, dims=1)
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_unprunable_layers_are_left_whole_and_named() -> None:
    torch.manual_seed(0)
    model = Rolled().eval()
    with pytest.warns(PruneWarning, match=r"conv1 \(.*roll") as rec:
        _, stats = plan_keep(model, (X,), "l1", ratio=0.5, global_ranking=False)
    assert len(rec) == 1 and "conv2" not in str(rec[0].message)
    assert set(stats.kept) == {"conv2", "conv3"} and stats.kept["conv2"] == 8


def test_bad_requests_are_refused(models: dict[str, nn.Module]) -> None:
    model = models["resnet20"]
    with pytest.raises(PruneError, match="exactly one of"):
        plan_keep(model, (X,), "l1", macs_reduction=0.5, ratio=0.5)
    with pytest.raises(PruneError, match="exactly one of"):
        plan_keep(model, (X,), "l1")
    with pytest.raises(PruneError, match=r"cannot remove 99\.0% of the MACs"):
        plan_keep(model, (X,), "l1", macs_reduction=0.99)
    with pytest.raises(PruneError, match="must be in"):
        plan_keep(model, (X,), "l1", ratio=0.95)


def test_taylor_from_a_list_of_batches_and_seeded_from_tensor_batches(
    models: dict[str, nn.Module], fmnist_test_small: Any
) -> None:
    model = models["resnet20"]
    groups = analyze(model, X).prunable_groups
    x, y = fmnist_test_small.images, fmnist_test_small.labels
    listed = [((x[i : i + 8],), y[i : i + 8]) for i in range(0, 64, 8)]
    crit = build_importance("taylor", listed, batches=2)
    assert len(crit.batches) == 2  # type: ignore[attr-defined]
    scores = crit.scores(model, groups)
    assert set(scores) == {g.id for g in groups}
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in scores.values())

    # a TensorBatches is re-cut by the seed alone: its augmentation, batch size and
    # iteration history do not matter
    source = augmented_batches(x, y, 32, seed=5)
    next(iter(source))
    got = build_importance("taylor", source, seed=1, batches=2, batch_size=8)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:16]
    want = [((x[i],), y[i]) for i in order.split(8)]
    for (gx, gy), (wx, wy) in zip(got.batches, want, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(gx[0], wx[0]) and torch.equal(gy, wy)

    with pytest.raises(PruneError, match="needs labels"):
        build_importance("taylor", [((x[:8],), None)])
    with pytest.raises(PruneError, match="needs training data"):
        build_importance("taylor", [])
    unlabelled = TensorBatches(x, None, 8, pairs=False)
    fluct = build_importance("fluctuation", unlabelled, batches=2)
    assert len(fluct.batches) == 2  # type: ignore[attr-defined]


class _ProjectedLSTMOnly(nn.Module):
    """Nothing prunable: an embedding into a projected LSTM into the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 6, batch_first=True, proj_size=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.emb(x))[0].mean(1))


def test_nothing_to_prune_names_each_fixed_group_and_why() -> None:
    tokens = torch.zeros(1, 7, dtype=torch.long)
    with pytest.raises(PruneError) as err:
        plan_pruning(_ProjectedLSTMOnly(), (tokens,), "l1", macs_reduction=0.3)
    msg = str(err.value)
    assert "no prunable channel group is left to prune in _ProjectedLSTMOnly" in msg
    assert "`lstm` (LSTM) with proj_size=4" in msg and "Embedding" in msg


class _Tcn(nn.Module):
    """A temporal conv net (causal dilated Conv1d blocks with residuals) as audio code
    writes it: groups of 32 and 64 channels, steps of 16."""

    def __init__(self) -> None:
        super().__init__()
        chans = [8, 32, 32, 64, 64]
        self.convs = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i in range(4):
            cin, cout = chans[i], chans[i + 1]
            self.convs.append(nn.ModuleList([nn.Conv1d(cin, cout, 3, dilation=2**i),
                                             nn.Conv1d(cout, cout, 3, dilation=2**i)]))  # fmt: skip
            self.downs.append(nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, ((c1, c2), down) in enumerate(zip(self.convs, self.downs, strict=True)):
            pad = 2 * 2**i
            h = torch.relu(c1(nn.functional.pad(x, (pad, 0))))
            h = torch.relu(c2(nn.functional.pad(h, (pad, 0))))
            x = torch.relu(h + down(x))
        return self.fc(x[:, :, -1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_target_one_step_swap_away_is_met_not_passed(seed: int) -> None:
    """When the importance order's walk can only pass the target (its next step overshoots)
    but giving back an earlier step lands in the window, the plan lands in it: a TCN asked
    for -30% got -34.7% while -30.1% was reachable."""
    torch.manual_seed(seed)
    model = _Tcn().eval()
    x = torch.randn(1, 8, 256)
    keep, stats = plan_keep(model, (x,), "l1", macs_reduction=0.3, round_to=16)
    assert 0.3 <= stats.macs_reduction <= 0.31, stats.macs_reduction
    pruned = prune_groups(copy.deepcopy(model), keep)
    assert total_macs(layer_table(pruned, x)) == stats.macs


class _StackedLstm(nn.Module):
    def __init__(self, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 32, 3, padding=1)
        self.lstm = nn.LSTM(32, 48, num_layers=layers, batch_first=True,
                            bidirectional=bidirectional)  # fmt: skip
        self.fc = nn.Linear(48 * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc(out[:, -1])


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, False), (3, True)])
def test_mac_model_of_stacked_recurrent_layers_is_exact(layers: int, bidirectional: bool) -> None:
    """A stack's later layers read the hidden state below: their input matmuls scale with
    the hidden axis, not the input's (a 2-layer LSTM asked for -30% read -61% out of reach)."""
    torch.manual_seed(0)
    model = _StackedLstm(layers, bidirectional).eval()
    x = torch.randn(1, 12, 20)
    keep, stats = plan_keep(model, (x,), "l1", macs_reduction=0.3)
    assert 0.3 <= stats.macs_reduction <= 0.31, stats.macs_reduction
    pruned = prune_groups(copy.deepcopy(model), keep)
    assert total_macs(layer_table(pruned, x)) == stats.macs


class _UpNet(nn.Module):
    """An encoder-decoder with a transposed conv whose input and output widths differ (its
    weight is ``(in, out, k, k)``, the other way round from a conv's)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(24, 48, 3, 1, 1), nn.BatchNorm2d(48), nn.ReLU())
        self.up = nn.ConvTranspose2d(48, 16, 2, stride=2)
        self.head = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.mid(self.down(x))))


def test_mac_model_of_a_transposed_conv_is_exact() -> None:
    """The planner's MACs of a pruned transposed conv equal the pruned model's (it read the
    weight's axes as a conv's: a U-Net asked for -30% measured -34.6%)."""
    torch.manual_seed(0)
    model = _UpNet().eval()
    x = torch.randn(1, 3, 32, 32)
    keep, stats = plan_keep(model, (x,), "l1", macs_reduction=0.3)
    assert 0.3 <= stats.macs_reduction <= 0.31, stats.macs_reduction
    pruned = prune_groups(copy.deepcopy(model), keep)
    assert total_macs(layer_table(pruned, x)) == stats.macs
