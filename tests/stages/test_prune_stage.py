"""Recipe stage ``prune``: fields validated at load time, and a small end-to-end run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from edgeslim.checkpoint import save_state
from edgeslim.errors import RecipeError
from edgeslim.graph import example_input, layer_table, total_macs
from edgeslim.prune import IMPORTANCE, load_pruned
from edgeslim.recipe import STAGES, StageContext, load_recipe, parse_recipe
from edgeslim.stages.prune import PruneStage, run_prune
from edgeslim.task import fashion_mnist_task
from edgeslim.zoo import load_zoo_model
from edgeslim.zoo.resnet import resnet20

X = example_input((1, 1, 28, 28))


def _parse(**fields: object) -> PruneStage:
    stage = parse_recipe({"stages": [{"kind": "prune", **fields}]}).stages[0]
    assert isinstance(stage, PruneStage)
    return stage


def test_prune_stage_is_registered_with_its_defaults() -> None:
    assert "prune" in STAGES and STAGES["prune"].data_used == "train"
    stage = _parse(macs_reduction=0.5, round_to=8, ratio=None)
    assert stage.criterion == "l1" and stage.global_ranking and stage.kd
    assert _parse(ratio={"layer1.0.conv1": 0.5}).ratio == {"layer1.0.conv1": 0.5}


def test_the_stage_declares_every_planner_option_with_the_planners_default() -> None:
    """Decision: a recipe's prune stage stays flat (``macs_reduction: 0.5``, not a nested
    ``planner:`` block) and builds :class:`PruneConfig` from the same names; this keeps the
    two declarations from drifting apart."""
    import dataclasses

    from edgeslim.prune.config import PruneConfig

    for f in dataclasses.fields(PruneConfig):
        assert f.name in PruneStage.model_fields, f.name
        default = f.default_factory() if callable(f.default_factory) else f.default
        if f.name == "round_to":  # the stage's unset round_to is auto, the planner's 1
            assert PruneStage.model_fields[f.name].default is None
            assert PruneStage(macs_reduction=0.3).prune_config().round_to == default
            continue
        assert PruneStage.model_fields[f.name].default == default, f.name


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"criterion": "l3", "macs_reduction": 0.5},
            "stages[0].criterion: Value error, unknown importance criterion 'l3'; allowed "
            f"values: {', '.join(IMPORTANCE.names())}",
        ),
        ({"macs_reduction": 1.5}, "stages[0].macs_reduction: Input should be less than 1"),
        ({"macs_reduction": 0.0}, "stages[0].macs_reduction: Input should be greater than 0"),
        ({"ratio": 1.2}, "stages[0].ratio: Value error, a pruning ratio must be in [0, 1)"),
        ({"macs_reduction": 0.5, "ratio": 0.5}, "exactly one of macs_reduction"),
        ({}, "exactly one of macs_reduction"),
        ({"macs_reduction": 0.5, "round_to": 0}, "stages[0].round_to"),
        ({"macs_reduction": 0.5, "finetune_epoch": 1}, "stages[0].finetune_epoch: unknown field"),
        (
            {"macs_reduction": 0.5, "method": "depth", "reconstruct": True},
            "reconstruct refits the layers a channel surgery narrowed: it needs method rank "
            "or gates",
        ),
        ({"macs_reduction": 0.5, "select_every": 1}, "select_every holds every n-th"),
        ({"macs_reduction": 0.5, "select_every": 4, "finetune_epochs": 0}, "finetune_epochs >= 1"),
    ],
)
def test_invalid_fields_name_the_field(fields: dict[str, object], expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        _parse(**fields)
    assert expected in str(err.value)


def test_shipped_prune_recipe_is_valid() -> None:
    recipe = load_recipe(Path(__file__).parents[2] / "examples" / "prune50.yaml")
    stage = recipe.stages[0]
    assert isinstance(stage, PruneStage) and stage.macs_reduction == 0.5
    assert stage.method == "gates"


def test_prune_stage_end_to_end_and_rebuild_from_its_plan(tmp_path: Path) -> None:
    model = load_zoo_model("resnet20")
    base = total_macs(layer_table(model, X))
    stage = _parse(macs_reduction=0.4, round_to=8, criterion="taylor", limit=256, batch_size=64)
    ctx = StageContext(out=tmp_path, model_name="resnet20", task=fashion_mnist_task(test_limit=100))
    pruned = run_prune(model, stage, ctx)
    reduction = 1 - total_macs(layer_table(pruned, X)) / base
    assert 0.4 <= reduction <= 0.42
    assert any(n.startswith("prune: taylor, global ranking") for n in ctx.notes)
    assert any("with KD from the unpruned model" in n for n in ctx.notes)
    assert (tmp_path / "model.plan.json").is_file()
    save_state(pruned, tmp_path / "model.safetensors")
    rebuilt = load_pruned(resnet20().eval(), tmp_path / "model", (X,))
    torch.testing.assert_close(rebuilt(X), pruned(X))


def test_prune_stage_with_learned_gates_meets_the_target(tmp_path: Path) -> None:
    model = load_zoo_model("resnet20")
    base = total_macs(layer_table(model, X))
    stage = _parse(method="gates", macs_reduction=0.3, limit=256, batch_size=64, finetune_epochs=0)
    ctx = StageContext(out=tmp_path, model_name="resnet20", task=fashion_mnist_task(test_limit=100))
    pruned = run_prune(model, stage, ctx)
    assert 1 - total_macs(layer_table(pruned, X)) / base >= 0.3
    assert any(n.startswith("prune: learned gates, 1 epoch(s) on 256 samples") for n in ctx.notes)
    # 256 samples in batches of 64: 4 gate steps, which the notes call too few
    assert any("took 4 step(s)" in n and n.startswith("WARNING") for n in ctx.notes)
    save_state(pruned, tmp_path / "model.safetensors")
    rebuilt = load_pruned(resnet20().eval(), tmp_path / "model", (X,))
    torch.testing.assert_close(rebuilt(X), pruned(X))


class _DenseBlock(torch.nn.Module):
    """A DenseNet-style block on 1 x 8 x 8 digits (untrained): a stem and two layers whose
    outputs are concatenated, so a stem channel is read by every later layer."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.l1 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 3, padding=1))
        self.norm = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(torch.relu(self.norm(x)).mean((2, 3)))


def test_gates_that_switch_off_far_more_than_asked_are_brought_back_to_the_target(
    tmp_path: Path,
) -> None:
    """On this untrained net the gates switch off 99% of the MACs for a -30% target; the
    stage brings the best of them back into its 2-point band instead of failing."""
    import edgeslim
    from edgeslim.task import digits_task

    torch.manual_seed(1)
    model = _DenseBlock().eval()
    task = digits_task()
    (x,) = task.example_inputs
    base = total_macs(layer_table(model, x))
    stage = {"kind": "prune", "method": "gates", "macs_reduction": 0.3, "limit": 512,
             "batch_size": 64, "finetune_epochs": 0}  # fmt: skip
    result = edgeslim.compress(model, {"stages": [stage]}, task, out=tmp_path / "o", quick=True)
    achieved = 1 - total_macs(layer_table(result.model, x)) / base
    assert abs(achieved - 0.3) <= 0.02, achieved


def test_gates_need_a_macs_target() -> None:
    with pytest.raises(RecipeError, match="method gates needs macs_reduction"):
        _parse(method="gates", ratio=0.3)


def _narrow_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
    ).eval()  # fmt: skip


def test_a_missed_macs_target_fails_naming_requested_and_achieved(tmp_path: Path) -> None:
    """round_to 8 on 16-channel layers can only halve a width: -20% requested, -46.9%
    measured (an overshoot is a miss too: the issue's user got -85% for 50%)."""
    import edgeslim
    from edgeslim.errors import PruneError
    from edgeslim.task import digits_task

    stage = {"kind": "prune", "macs_reduction": 0.2, "round_to": 8, "finetune_epochs": 0}
    with pytest.raises(PruneError, match=r"asked for -20\.0% MACs .* achieved -46\.9%"):
        edgeslim.compress(_narrow_cnn(), {"stages": [stage]}, digits_task(), out=tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
    allowed = {"stages": [{**stage, "allow_target_miss": True}]}
    out = tmp_path / "ok"
    result = edgeslim.compress(_narrow_cnn(), allowed, digits_task(), out=out, quick=True)
    config = result.records[0].config
    assert config["macs_reduction"] == pytest.approx(0.469, abs=0.001)
    assert config["macs_target"] == 0.2 and config["allow_target_miss"] is True
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and "prune target missed" in report


def test_a_plan_missing_the_target_fails_before_the_surgery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner measures its plan's reduction: a miss fails then, not after the surgery,
    the refit and the fine-tune (a user waited through all three for the same error)."""
    import edgeslim
    import edgeslim.prune.planner as planner
    from edgeslim.errors import PruneError
    from edgeslim.task import digits_task

    def no_surgery(*args: object, **kwargs: object) -> None:
        raise AssertionError("the surgery ran")

    monkeypatch.setattr(planner, "apply_keep", no_surgery)
    stage = {"kind": "prune", "macs_reduction": 0.2, "round_to": 8, "finetune_epochs": 3,
             "reconstruct": True}  # fmt: skip
    with pytest.raises(PruneError, match=r"asked for -20\.0% MACs .* achieved -46\.9%"):
        edgeslim.compress(_narrow_cnn(), {"stages": [stage]}, digits_task(), out=tmp_path / "r")


def test_prune_stage_with_latency_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``latency_weight`` reaches the planner: the target holds, the note says how the
    ranking was tilted, and the machine's latency table is cached where the user said."""
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    model = load_zoo_model("resnet20")
    base = total_macs(layer_table(model, X))
    stage = _parse(macs_reduction=0.3, round_to=8, latency_weight=1.0, finetune_epochs=0)
    ctx = StageContext(out=tmp_path, model_name="resnet20", task=fashion_mnist_task(test_limit=100))
    pruned = run_prune(model, stage, ctx)
    assert 0.3 <= 1 - total_macs(layer_table(pruned, X)) / base <= 0.32
    assert any("tilted by fp32 latency per MAC (weight 1.0)" in n for n in ctx.notes)
    assert list((tmp_path / "cache").glob("latency-*.json"))


def test_a_target_out_of_reach_is_refused_or_pruned_as_far_as_it_goes(tmp_path: Path) -> None:
    """max_group_ratio 0.5 leaves half of each group: -90% is out of reach. Refused, naming
    the reachable reduction and the option; with allow_target_miss, pruned that far."""
    import edgeslim
    from edgeslim.errors import UnreachableTargetError
    from edgeslim.task import digits_task

    stage = {"kind": "prune", "macs_reduction": 0.9, "max_group_ratio": 0.5, "finetune_epochs": 0}
    with pytest.raises(UnreachableTargetError, match=r"at most .*allow_target_miss") as info:
        edgeslim.compress(_narrow_cnn(), {"stages": [stage]}, digits_task(), out=tmp_path / "r")
    assert 0.3 < info.value.best < 0.9
    assert list(tmp_path.iterdir()) == []
    allowed = {"stages": [{**stage, "allow_target_miss": True}]}
    out = tmp_path / "ok"
    result = edgeslim.compress(_narrow_cnn(), allowed, digits_task(), out=out, quick=True)
    assert result.records[0].config["macs_reduction"] == pytest.approx(info.value.best, abs=0.02)
    report = (out / "report.md").read_text()
    assert "out of reach" in report and "prune target missed" in report


def test_gates_out_of_reach_are_refused_or_trained_as_far_as_they_go(tmp_path: Path) -> None:
    """round_to 8 on 16-channel layers: the gates reach -72% at most. -90% is refused
    before training; with allow_target_miss the gates are trained to -72% and say so (the
    option was ignored by the gates, as the shipped prune50 recipe sets it)."""
    import edgeslim
    from edgeslim.errors import UnreachableTargetError
    from edgeslim.task import digits_task

    stage = {"kind": "prune", "method": "gates", "macs_reduction": 0.9, "round_to": 8,
             "finetune_epochs": 0, "limit": 128}  # fmt: skip
    with pytest.raises(UnreachableTargetError) as info:
        edgeslim.compress(_narrow_cnn(), {"stages": [stage]}, digits_task(), out=tmp_path / "r")
    assert info.value.best == pytest.approx(1 - 46592 / 166912, abs=1e-3)
    allowed = {"stages": [{**stage, "allow_target_miss": True}]}
    out = tmp_path / "ok"
    result = edgeslim.compress(_narrow_cnn(), allowed, digits_task(), out=out, quick=True)
    assert result.records[0].config["macs_reduction"] == pytest.approx(info.value.best, abs=0.02)
    report = (out / "report.md").read_text()
    assert "out of reach of the learned gates" in report and "prune target missed" in report


def test_depth_removes_whole_branches_to_the_target_and_rebuilds_from_its_plan(
    tmp_path: Path,
) -> None:
    import json

    from edgeslim.checkpoint import load_state
    from edgeslim.prune.depth import BranchMean
    from edgeslim.stages.prune import rebuild_prune

    model = load_zoo_model("resnet20")
    base = total_macs(layer_table(model, X))
    stage = _parse(method="depth", macs_reduction=0.2, finetune_epochs=0)
    ctx = StageContext(out=tmp_path, model_name="resnet20", task=fashion_mnist_task(test_limit=100))
    pruned = run_prune(model, stage, ctx)
    reduction = 1 - total_macs(layer_table(pruned, X)) / base
    assert 0.2 <= reduction < 0.2 + 0.12  # whole branches: past the target by less than one
    assert any("points past it" in n for n in ctx.notes)  # not failed as a miss
    plan = json.loads((tmp_path / "model.plan.json").read_text())
    assert plan["format"] == "edgeslim-depth-plan" and len(plan["removed"]) == 2
    save_state(pruned, tmp_path / "model.safetensors")
    rebuilt = load_state(rebuild_prune(resnet20(), tmp_path / "model.plan.json", (X,)),
                         tmp_path / "model.safetensors")  # fmt: skip
    assert sum(isinstance(m, BranchMean) for m in rebuilt.modules()) == 2
    torch.testing.assert_close(rebuilt.eval()(X), pruned(X))
    with pytest.raises(RecipeError, match="method depth needs macs_reduction"):
        _parse(method="depth", ratio=0.3)


def test_prune_stage_reconstructs_before_the_fine_tune(tmp_path: Path) -> None:
    """``reconstruct: true`` without fine-tuning: the refitted model scores far higher on
    test images than the same surgery without it."""
    task = fashion_mnist_task(test_limit=500)
    tops = {}
    for flag in (False, True):
        stage = _parse(macs_reduction=0.5, round_to=4, finetune_epochs=0, reconstruct=flag,
                       reconstruct_samples=256)  # fmt: skip
        ctx = StageContext(out=tmp_path / str(flag), model_name="resnet20", task=task)
        pruned = run_prune(load_zoo_model("resnet20"), stage, ctx)
        tops[flag] = task.measure(pruned)[task.metric]
        notes = [n for n in ctx.notes if n.startswith("prune reconstruct:")]
        assert bool(notes) is flag
    assert "on 256 calibration samples" in notes[0]
    assert tops[True] >= tops[False] + 20, tops


def test_prune_stage_reconstructs_after_learned_gates(tmp_path: Path) -> None:
    """``method: gates`` with ``reconstruct: true``: the layers the gates narrowed are
    refitted to the model from before the gates (the note says how many, with the error
    before and after), the target holds, and the refit lowers the mean output error."""
    task = fashion_mnist_task(test_limit=500)
    stage = _parse(method="gates", macs_reduction=0.5, round_to=8, gate_epochs=1,
                   finetune_epochs=0, limit=512, reconstruct=True,
                   reconstruct_samples=128)  # fmt: skip
    ctx = StageContext(out=tmp_path, model_name="resnet20", task=task)
    pruned = run_prune(load_zoo_model("resnet20"), stage, ctx)
    note = next(n for n in ctx.notes if n.startswith("prune reconstruct:"))
    assert "on 128 calibration samples" in note
    errors = re.search(r"mean relative output error ([0-9.]+) -> ([0-9.]+)", note)
    assert errors is not None, note
    assert float(errors[2]) < float(errors[1])
    assert any(n.startswith("prune: MACs -") for n in ctx.notes)
    assert task.measure(pruned)[task.metric] > 50.0


def test_select_every_keeps_the_refitted_model_when_the_fine_tune_only_hurts(
    tmp_path: Path,
) -> None:
    """A fine-tune at a wild learning rate wrecks a refitted model; with ``select_every`` the
    stage sees it on held-out training samples and keeps the model from before training."""
    task = fashion_mnist_task(test_limit=500)
    scores, notes = {}, {}
    for every in (0, 4):
        stage = _parse(macs_reduction=0.5, round_to=4, reconstruct=True, finetune_epochs=1,
                       lr=1.0, limit=512, select_every=every)  # fmt: skip
        ctx = StageContext(out=tmp_path / str(every), model_name="resnet20", task=task)
        pruned = run_prune(load_zoo_model("resnet20"), stage, ctx)
        scores[every] = task.measure(pruned)[task.metric]
        notes[every] = next(n for n in ctx.notes if n.startswith("prune fine-tune:"))
    assert "on 384 samples" in notes[4] and "kept the model before training" in notes[4]
    assert "kept" not in notes[0]
    assert scores[4] >= scores[0] + 20, scores


def _wide_cnn() -> torch.nn.Module:
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def _widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_an_unset_round_to_takes_the_coarsest_step_that_meets_the_target(tmp_path: Path) -> None:
    # free widths ran slower than the unpruned model in ONNX Runtime on 9 of 16
    # torchvision/timm CNNs at -30% MACs; an unset round_to now plans at 8 where the target
    # allows it, and finer where it does not (resnet20's 16-wide groups at -30%)
    ctx = StageContext(out=tmp_path / "wide", model_name="wide", task=fashion_mnist_task(100))
    wide = run_prune(_wide_cnn(), _parse(macs_reduction=0.3, finetune_epochs=0), ctx)
    assert all(w % 8 == 0 for w in _widths(wide)) and _widths(wide) != [64, 64, 64]
    assert any(n.startswith("prune: round_to 8 (auto") for n in ctx.notes)
    assert any("round_to 8;" in n for n in ctx.notes)
    # two 12-wide groups: steps of 8 or 4 reach -0%, -31%, -33% ..., never -15%; 2 does
    nn = torch.nn
    torch.manual_seed(0)
    narrow = nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    ).eval()  # fmt: skip
    base = total_macs(layer_table(narrow, X))
    fine = StageContext(out=tmp_path / "narrow", model_name="narrow", task=fashion_mnist_task(100))
    pruned = run_prune(narrow, _parse(macs_reduction=0.15, finetune_epochs=0), fine)
    assert abs(1 - total_macs(layer_table(pruned, X)) / base - 0.15) <= 0.02
    (chosen,) = [n for n in fine.notes if "(auto:" in n]
    assert chosen.startswith("prune: round_to 2 (auto"), chosen
    by_hand = StageContext(out=tmp_path / "one", model_name="wide", task=fashion_mnist_task(100))
    run_prune(_wide_cnn(), _parse(macs_reduction=0.3, finetune_epochs=0, round_to=1), by_hand)
    assert not any("(auto:" in n for n in by_hand.notes)
