"""Recipe stage ``search`` on a small CNN trained on sklearn digits (real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches, load_digits_split
from edgeslim.errors import CheckpointError, RecipeError
from edgeslim.recipe import parse_recipe
from edgeslim.task.resolve import builtin_task
from edgeslim.train.loop import TrainConfig, train_classifier


def _digits_cnn() -> nn.Module:
    train = load_digits_split("train")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    batches = TensorBatches(train.images, train.labels, 64, shuffle=True)
    cfg = TrainConfig(epochs=6, lr=0.05, channels_last=False)
    train_classifier(model, batches, cfg, description="digits")
    return model.eval()


def _recipe(**fields: object) -> dict[str, object]:
    stage = {"kind": "search", "constraints": ["size<=0.2x"], "max_drop": 6.0,
             "strategy": "random", "budget": 3, "w_bits": [4, 8], "keep": [1.0]}  # fmt: skip
    return {"name": "searched", "stages": [{**stage, **fields}]}


def test_invalid_search_stage_names_the_field_and_allowed_values() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(strategy="annealing", constraints=["speed<=2x"]))
    text = str(info.value)
    assert "strategy" in text and "evolutionary" in text  # every error at once
    assert "speed" in text and "size" in text
    # bits a quantizer cannot take are refused with the recipe, not after the model loads
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(w_bits=[4, 16], a_bits=[0]))
    text = str(info.value)
    assert "w_bits" in text and "1..8" in text and "a_bits" in text
    # a strategy option it does not take, with the ones it does
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(strategy="evolutionary", options={"pop": 4}))
    text = str(info.value)
    assert "'pop'" in text and "population (default 8)" in text
    with pytest.raises(RecipeError, match="criterion") as info:
        parse_recipe(_recipe(criterion="loudest"))
    assert "fpgm" in str(info.value)


def test_search_stage_applies_a_feasible_policy(tmp_path: Path) -> None:
    model = _digits_cnn()
    task = builtin_task("digits")
    out = tmp_path / "run"
    result = edgeslim.compress(model, _recipe(), task, out)
    policy = json.loads((out / "search.policy.json").read_text())
    assert set(policy["layers"]) and (out / "search.json").is_file()
    record = result.records[0]
    assert record.size_bytes <= 0.2 * edgeslim.cost_report(model, *task.example_inputs).size_bytes
    assert any("search (random" in n for n in result.notes)
    # the searched model reloads bit for bit (load compares the recorded outputs)
    x = task.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(edgeslim.load(out, model)(x), result.model(x))
    # nothing meets an impossible target: the stage fails, no model is passed on
    with pytest.raises(edgeslim.errors.EdgeslimError, match="NO FEASIBLE POLICY"):
        edgeslim.compress(model, _recipe(constraints=["size<=0.01x"]), task, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_search_stage_with_a_latency_limit_times_its_policy_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit every policy meets: the stage's notes give the kept policy's measured ratio
    beside the table's (the limit was checked on the exported model, not only predicted)."""
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    model = _digits_cnn()
    recipe = _recipe(constraints=["latency<=10x"], budget=2)
    result = edgeslim.compress(model, recipe, builtin_task("digits"), tmp_path / "run")
    timed = [n for n in result.notes if "timed whole" in n]
    assert len(timed) == 1 and "x fp32" in timed[0] and "table" in timed[0]
    data = json.loads((tmp_path / "run" / "search.json").read_text())
    verdict = data["notes"]["latency_measured"]
    assert verdict["chosen"] == data["best"]["result"]["policy_id"]
    assert verdict["candidates"][0]["ok"]


def test_search_stage_options_reach_the_strategy(tmp_path: Path) -> None:
    """The metric and one size limit: envelope_ddpg's preference needs two weights, and
    says so when the recipe gives three (the value is checked by the strategy itself)."""
    recipe = _recipe(strategy="envelope_ddpg", options={"preference": [1.0, 0.0, 0.0]})
    with pytest.raises(edgeslim.errors.EdgeslimError, match="preference needs 2 weights"):
        edgeslim.compress(_digits_cnn(), recipe, builtin_task("digits"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_pruned_searched_model_reloads_and_trains_on(tmp_path: Path) -> None:
    """Channels cut by the search: the saved structure (kept channels, bits) is replayed
    before the weights load; a changed one is refused (the manifest's checksums), never
    half-loaded."""
    model = _digits_cnn()
    task = builtin_task("digits")
    out = tmp_path / "run"
    recipe = _recipe(keep=[0.5, 1.0], w_bits=[4, 8], max_drop=30.0, constraints=["macs<=0.8x"])
    result = edgeslim.compress(model, recipe, task, out)
    structure = json.loads((out / "model.plan.search.json").read_text())
    assert structure["plan"] is not None and result.paths["plan"].name == "model.plan.search.json"
    x = torch.cat([b[0] for b in task.calibration_batches(32)])
    reloaded = edgeslim.load(out, model)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    # a later recipe takes it as it is: still pruned
    again = edgeslim.compress(reloaded, {"name": "ft", "stages": [{"kind": "finetune",
                              "epochs": 1}]}, task, tmp_path / "ft")  # fmt: skip
    assert again.records[0].macs == result.records[0].macs
    structure["plan"]["keep"] = {k: v[:1] for k, v in structure["plan"]["keep"].items()}
    (out / "model.plan.search.json").write_text(json.dumps(structure))
    with pytest.raises(CheckpointError):
        edgeslim.load(out, model)


def test_a_saved_policy_is_applied_without_searching(tmp_path: Path) -> None:
    """A policy found earlier (here by a search stage) is applied by a later recipe with
    the same choices; a space that would cut other channels than the search did is refused;
    constraints beside a policy are refused when the recipe is read."""
    model = _digits_cnn()
    task = builtin_task("digits")
    found = tmp_path / "found"
    searched = edgeslim.compress(
        model, _recipe(keep=[0.5, 1.0], max_drop=30.0, constraints=["macs<=0.8x"]), task, found
    )
    saved = found / "search.policy.json"
    apply = {"kind": "search", "policy": str(saved), "w_bits": [4, 8], "keep": [0.5, 1.0]}
    again = edgeslim.compress(model, {"name": "apply", "stages": [apply]}, task, tmp_path / "a")
    assert any("applied from" in n and "not searched" in n for n in again.notes)
    assert again.records[0].macs == searched.records[0].macs
    x = torch.cat([b[0] for b in task.calibration_batches(32)])
    with torch.no_grad():  # same policy, same calibration: the same model
        assert torch.equal(again.model(x), searched.model(x))
    assert edgeslim.load(tmp_path / "a", model) is not None  # reloads like a searched one
    # the search saved which channels it cut: a space that cuts others is refused
    beside = found / "search.policy.structure.json"
    structure = json.loads(beside.read_text())
    structure["plan"]["keep"] = {k: v[1:] + v[:1] for k, v in structure["plan"]["keep"].items()}
    beside.write_text(json.dumps(structure))
    with pytest.raises(edgeslim.errors.EdgeslimError, match="plan differ"):
        edgeslim.compress(model, {"name": "other", "stages": [apply]}, task, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(RecipeError, match="leave constraints and max_drop out"):
        parse_recipe({"name": "x", "stages": [{**apply, "max_drop": 1.0}]})
    with pytest.raises(RecipeError, match="or a saved policy"):
        parse_recipe({"name": "x", "stages": [{"kind": "search"}]})


def test_a_search_after_quantization_is_refused_naming_the_layers(tmp_path: Path) -> None:
    """A search picks the bits itself: a second search stage (or one after a quantize
    stage) meets a quantized model and says so instead of a tracing error."""
    first = _recipe()["stages"][0]  # type: ignore[index]
    recipe = {"name": "two", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8}, first]}
    with pytest.raises(edgeslim.errors.EdgeslimError, match="quantized already") as info:
        edgeslim.compress(_digits_cnn(), recipe, builtin_task("digits"), tmp_path / "q")
    assert "before any quantize stage" in str(info.value)
    assert not (tmp_path / "q").exists()
