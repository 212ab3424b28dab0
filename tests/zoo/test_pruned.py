"""Shipped pruned models: rebuilt exactly from plan + safetensors, checked, and made by recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from edgeslim.data import load_fashion_mnist
from edgeslim.errors import CheckpointError, UnknownModelError
from edgeslim.graph import example_input, layer_table, total_macs
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_card, resolve_model
from edgeslim.zoo.pruned import load_pruned_zoo_model, make_pruned, shipped_pruned

X = example_input((1, 1, 28, 28))
NAME = "resnet20-pruned50"


def test_shipped_pruned_model_matches_its_card() -> None:
    assert NAME in shipped_pruned()
    card = load_card(NAME)
    model = load_pruned_zoo_model(NAME)
    assert total_macs(layer_table(model, X)) == card["macs"] <= 0.5 * card["base_macs"]
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    assert evaluate(model, load_fashion_mnist("test")) == pytest.approx(card["test_top1"], abs=0.02)
    again = resolve_model(NAME)
    torch.testing.assert_close(again(X), model(X))


def test_tampered_pruned_weights_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeslim.zoo import pruned, registry

    src = registry.checkpoint_dir()
    for suffix in (".json", ".plan.json", ".safetensors"):
        shutil.copy(src / f"{NAME}{suffix}", tmp_path / f"{NAME}{suffix}")
    shutil.copy(src / "resnet20.json", tmp_path / "resnet20.json")
    monkeypatch.setattr(registry, "checkpoint_dir", lambda: tmp_path)
    monkeypatch.setattr(pruned, "checkpoint_dir", lambda: tmp_path)
    assert load_pruned_zoo_model(NAME) is not None  # the copy itself is fine
    weights = tmp_path / f"{NAME}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_pruned_zoo_model(NAME)


def test_unknown_pruned_name_lists_the_shipped_ones() -> None:
    with pytest.raises(UnknownModelError, match=NAME):
        load_pruned_zoo_model("resnet20-pruned99")


def test_make_pruned_writes_plan_weights_and_an_honest_card(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - kind: prune\n    criterion: l1\n    macs_reduction: 0.3\n"
        "    round_to: 8\n    finetune_epochs: 0\n    limit: 64\n"
    )
    card = make_pruned("resnet20", recipe, "tiny", out=tmp_path / "zoo")
    files = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert files == ["tiny.json", "tiny.plan.json", "tiny.safetensors"]
    on_disk = json.loads((tmp_path / "zoo" / "tiny.json").read_text())
    assert on_disk == card and card["base"] == "resnet20"
    assert 0.3 <= card["macs_reduction"] <= 0.31
    assert card["recipe"]["stages"][0]["criterion"] == "l1"
    assert 10.0 < card["test_top1"] <= 100.0
