"""``PruneConfig``: the planner's options as one validated, JSON-ready value."""

from __future__ import annotations

import json

import pytest

from edgeslim.errors import PruneError
from edgeslim.graph import example_input
from edgeslim.prune import PruneConfig, plan_pruning
from edgeslim.stages.prune import PruneStage
from edgeslim.zoo import load_zoo_model

X = example_input((1, 1, 28, 28))


def test_a_config_plans_what_its_keywords_plan() -> None:
    model = load_zoo_model("resnet20")
    cfg = PruneConfig(macs_reduction=0.4, round_to=8, skip=("layer3.*",))
    by_config = plan_pruning(model, (X,), "l1", cfg)
    by_keywords = plan_pruning(model, (X,), "l1", macs_reduction=0.4, round_to=8, skip=["layer3.*"])
    assert by_config.keep == by_keywords.keep and by_config.keep
    assert not any(k.startswith("layer3.") for k in by_config.keep)
    # keywords replace the config's fields
    everywhere = plan_pruning(model, (X,), "l1", cfg, skip=())
    assert any(k.startswith("layer3.") for k in everywhere.keep)
    assert all(len(v) % 8 == 0 for v in everywhere.keep.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of macs_reduction"),
        ({"macs_reduction": 0.3, "ratio": 0.2}, "exactly one of macs_reduction"),
        ({"macs_reduction": 1.2}, r"macs_reduction must be in \(0, 1\)"),
        ({"ratio": {"conv1": 1.0}}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.3, "round_to": 0}, "round_to must be >= 1"),
        ({"ratio": 0.3, "max_group_ratio": 1.0}, "max_group_ratio"),
        ({"ratio": 0.3, "latency_weight": 1.0}, "latency_weight tilts the global ranking"),
        ({"macs_reduction": 0.3, "latency_weight": -1.0}, "latency_weight must be >= 0"),
        ({"macs_reduction": 0.3, "ratios": 0.2}, "unknown pruning option.*ratios.*allowed:"),
    ],
)
def test_invalid_options_are_refused_by_name(options: dict[str, object], message: str) -> None:
    with pytest.raises(PruneError, match=message):
        PruneConfig.build(**options)


def test_config_is_frozen_and_json_round_trips() -> None:
    cfg = PruneConfig(ratio={"layer1.*": 0.25}, skip=["conv1"])  # type: ignore[arg-type]
    assert cfg.skip == ("conv1",)
    assert PruneConfig(ratio=0.2, skip="layer3.*").skip == ("layer3.*",)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        cfg.round_to = 4  # type: ignore[misc]
    text = json.dumps(cfg.to_dict())
    assert PruneConfig(**json.loads(text)) == cfg


def test_the_prune_stage_hands_the_planner_its_own_config() -> None:
    stage = PruneStage(macs_reduction=0.3, round_to=4, skip=("fc",), latency_weight=0.5)
    assert stage.prune_config() == PruneConfig(
        macs_reduction=0.3, round_to=4, skip=("fc",), latency_weight=0.5
    )


def test_gate_config_builds_from_keywords_and_refuses_bad_values() -> None:
    from edgeslim.prune import GateConfig

    cfg = GateConfig.build(macs_reduction=0.5, round_to=8)
    assert cfg == GateConfig(0.5, round_to=8) and cfg.mode == "hard"
    assert GateConfig.build(cfg, mode="soft").mode == "soft"
    assert json.loads(json.dumps(cfg.to_dict()))["round_to"] == 8
    for options, message in (
        ({"macs_reduction": 1.0}, r"macs_reduction must be in \[0, 1\)"),
        ({"macs_reduction": 0.5, "mode": "fuzzy"}, "mode must be hard or soft"),
        ({"macs_reduction": 0.5, "enforce_at": 2.0}, "enforce_at"),
        ({"macs_reduction": 0.5, "gate_lr": 0.0}, "gate_lr > 0"),
        ({"macs_reduction": 0.5, "lr": 0.1}, "unknown gate option.*lr.*allowed:"),
        ({"round_to": 8}, "GateConfig needs macs_reduction"),
    ):
        with pytest.raises(PruneError, match=message):
            GateConfig.build(**options)
