"""Latency-aware global ranking: the MACs target still holds, and the plan removes MACs
that cost more time per MAC on this machine (by the same latency table)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.cost.lut import FP32, LatencyTable, LayerKey, layer_key
from edgeslim.errors import PruneError
from edgeslim.graph import layer_table, total_macs
from edgeslim.graph.model_graph import analyze
from edgeslim.prune.latency_rank import group_latency_factors, layer_ms_per_mac
from edgeslim.prune.planner import MacModel, apply_keep, candidate_groups, plan_keep


class _Net(nn.Module):
    """A high-resolution depthwise block, then a low-resolution dense one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 64, 1)
        self.down = nn.Conv2d(64, 64, 3, stride=4, padding=1)
        self.dense = nn.Conv2d(64, 96, 3, padding=1)
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        x = torch.relu(self.dense(torch.relu(self.down(torch.relu(self.pw(x))))))
        return self.head(x.mean((2, 3)))


def _predicted_ms(model: nn.Module, x: torch.Tensor, table: LatencyTable) -> float:
    total = 0.0
    for fqn, row in layer_table(model, x).items():
        key = layer_key(model.get_submodule(fqn), row, FP32)
        if key is not None and row.macs:
            total += table.layer_ms(key)
    return total


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> LatencyTable:
    return LatencyTable(repeats=10, cache_dir=tmp_path_factory.mktemp("lut"))


def test_factors_are_relative_to_the_model_mean(table: LatencyTable) -> None:
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 3, 32, 32)
    graph = analyze(model, x)
    cands, _ = candidate_groups(graph, [])
    macs = MacModel(model, graph, cands)
    per_mac = layer_ms_per_mac(model, layer_table(model, x), table)
    assert set(per_mac) >= {"stem", "dw", "pw", "down", "dense"}
    factors = group_latency_factors(macs, per_mac, len(cands))
    assert len(factors) == len(cands) and all(f > 0 for f in factors)
    assert min(factors) < 1.0 < max(factors)  # some groups cost more per MAC than others


class _CostTable(LatencyTable):
    """A table with fixed costs in place of timings, so the planner's use of it is checked
    without timing noise (under pytest-xdist another test shares the cores): a MAC of a
    depthwise or 32x32 conv costs four of the others."""

    def relative(self, key: LayerKey) -> float:
        out = [s // max(st, 1) for s, st in zip(key.spatial, key.stride or (1,) * 2, strict=False)]
        macs = key.rows * key.cout * key.cin // key.groups
        for k in (*key.kernel, *out):
            macs *= k
        slow = key.groups > 1 or max(key.spatial, default=0) >= 32
        return macs * (4.0 if slow else 1.0) * 1e-6

    def probe_ms(self, precision: str) -> float:
        return 1.0


def test_latency_weight_keeps_the_target_and_removes_slower_macs(tmp_path: Path) -> None:
    table = _CostTable(cache_dir=tmp_path)
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 3, 32, 32)
    base = total_macs(layer_table(model, x))
    pruned = {}
    for weight in (0.0, 4.0):
        keep, stats = plan_keep(model, (x,), "l1", macs_reduction=0.4,
                                latency_weight=weight, latency_table=table)  # fmt: skip
        assert 0.4 <= stats.macs_reduction <= 0.41 + 1e-9
        m = apply_keep(_copy(model), keep, "l1")
        assert total_macs(layer_table(m, x)) == stats.macs < base
        pruned[weight] = m
    assert _predicted_ms(pruned[4.0], x, table) < 0.95 * _predicted_ms(pruned[0.0], x, table)
    same, _ = plan_keep(model, (x,), "l1", macs_reduction=0.4)
    plain, _ = plan_keep(model, (x,), "l1", macs_reduction=0.4, latency_weight=0.0)
    assert {k.id: v for k, v in same.items()} == {k.id: v for k, v in plain.items()}


def test_negative_latency_weight_is_refused() -> None:
    with pytest.raises(PruneError, match="latency_weight"):
        plan_keep(_Net().eval(), (torch.randn(1, 3, 32, 32),), "l1", macs_reduction=0.3,
                  latency_weight=-1.0)  # fmt: skip


def test_recipe_refuses_latency_weight_without_a_ranked_macs_target() -> None:
    from pydantic import ValidationError

    from edgeslim.stages.prune import PruneStage

    PruneStage(macs_reduction=0.3, latency_weight=1.0)
    with pytest.raises(ValidationError, match="latency_weight"):
        PruneStage(method="gates", macs_reduction=0.3, latency_weight=1.0)
    with pytest.raises(ValidationError, match="latency_weight"):
        PruneStage(ratio=0.3, latency_weight=1.0)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
