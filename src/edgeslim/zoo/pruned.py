"""Shipped pruned models: a zoo CNN pruned (and fine-tuned) by a recipe, stored without
pickle as ``NAME.plan.json`` + ``NAME.safetensors`` beside a JSON card.

``edgeslim zoo prune resnet20 --recipe examples/prune50.yaml --name resnet20-pruned50``
makes one: it runs the recipe's stages on the shipped ``resnet20``, measures the result
on the whole Fashion-MNIST test split, and writes the three files (by default into the
shipped checkpoints). A shipped pruned model then resolves like any zoo name
(``edgeslim compress resnet20-pruned50 ...``); its card names the base model, the
command, the measured top-1 and MACs, and the weights' SHA-256, checked on every load.

Decision — ship the result rather than prune in ``make demo``: a fine-tune worth showing
takes minutes on 2 cores, and the demo must stay under 5 minutes in total.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.artifacts import ZOO_OUT, check_named_outputs, temp_file, versions
from edgeslim.checkpoint import sha256_file
from edgeslim.errors import CheckpointError, RecipeError, UnknownModelError
from edgeslim.recipe.schema import Recipe
from edgeslim.zoo.registry import ZOO, card_path, checkpoint_dir, load_card, load_zoo_model

INPUT_SHAPE = (1, 1, 28, 28)


def is_pruned_name(name: str) -> bool:
    """Whether ``name`` is a shipped pruned model (a card with a ``base`` model)."""
    if name in ZOO or not card_path(name).is_file():
        return False
    try:
        return "base" in load_card(name)
    except CheckpointError:
        return False


def shipped_pruned() -> list[str]:
    """Names of the shipped pruned models."""
    return sorted(
        p.name.removesuffix(".plan.json")
        for p in checkpoint_dir().glob("*.plan.json")
        if is_pruned_name(p.name.removesuffix(".plan.json"))
    )


def load_pruned_zoo_model(name: str) -> nn.Module:
    """Rebuild a shipped pruned model from its base zoo model, plan and checked weights."""
    from edgeslim.graph import example_input
    from edgeslim.prune.plan import load_pruned

    if not is_pruned_name(name):
        raise UnknownModelError(
            f"{name!r} is not a shipped pruned model; shipped: {', '.join(shipped_pruned())}"
        )
    card = load_card(name)
    stem = checkpoint_dir() / name
    weights = stem.with_suffix(".safetensors")
    if weights.is_file() and sha256_file(weights) != card.get("sha256"):
        raise CheckpointError(
            f"checkpoint {weights} does not match the SHA-256 recorded in its card; it is "
            f"corrupt or was replaced. Restore it (git checkout) or remake it with "
            f"`{card.get('command', 'edgeslim zoo prune')}`."
        )
    base = load_zoo_model(str(card["base"]), pretrained=False)
    return load_pruned(base, stem, (example_input(INPUT_SHAPE),)).eval()


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON data, every stage with all its fields."""
    stages = [stage.model_dump(mode="json") for stage in recipe.stages]
    return {"name": recipe.name, "description": recipe.description, "stages": stages}


def make_pruned(
    base: str,
    recipe_path: Path,
    name: str,
    out: Path | None = None,
    command: str = "",
    force: bool = False,
) -> dict[str, Any]:
    """Run ``recipe_path`` on zoo model ``base``; write ``name``'s plan, weights and card.

    ``out`` defaults to ``./zoo-out`` (never the installed package; pass the checkpoints
    folder explicitly to ship a model). The recipe, the names and the folder are checked
    before any work; existing files of ``name`` need ``force``. Files are written under
    temporary names and renamed at the end, the card last."""
    from edgeslim.data import TensorBatches, load_fashion_mnist
    from edgeslim.graph import example_input, layer_table, total_macs
    from edgeslim.prune.plan import PrunePlan, save_pruned
    from edgeslim.recipe import STAGES, StageContext, load_recipe
    from edgeslim.task import fashion_mnist_task
    from edgeslim.train.loop import evaluate

    if base not in ZOO:
        raise UnknownModelError(f"{base!r} is not a zoo CNN; zoo: {', '.join(ZOO)}")
    recipe = load_recipe(recipe_path)
    if [s.kind for s in recipe.stages].count("prune") != 1:
        raise RecipeError(
            f"recipe {recipe_path} must hold exactly one prune stage to make a shipped pruned model"
        )
    target = out if out is not None else ZOO_OUT
    files = [f"{name}.plan.json", f"{name}.safetensors", f"{name}.json"]
    check_named_outputs(target, files, force)
    x = example_input(INPUT_SHAPE)
    model = load_zoo_model(base)
    base_macs = total_macs(layer_table(model, x))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(out=Path(tmp), model_name=base, task=fashion_mnist_task())
        for stage in recipe.stages:
            model = STAGES[stage.kind].handler(model, stage, ctx)
        plans = sorted(Path(tmp).glob("model.plan*.json"))
        if len(plans) != 1:
            raise UnknownModelError(
                f"recipe {recipe_path} must prune exactly once to make a shipped pruned model; "
                f"it wrote {len(plans)} plan(s)"
            )
        plan = PrunePlan.load(plans[0])
        seconds = time.perf_counter() - t0
        staged = Path(tmp) / "out"
        plan_tmp, weights_tmp = save_pruned(model.eval(), plan, staged / name)
        test = load_fashion_mnist("test")
        macs = total_macs(layer_table(model, x))
        card: dict[str, Any] = {
            "name": name,
            "base": base,
            "description": f"{base} pruned by {recipe_path.name}",
            "command": command or f"edgeslim zoo prune {base} --recipe {recipe_path} --name {name}",
            "recipe": recipe_dict(recipe),
            "notes": ctx.notes,
            "test_top1": round(evaluate(model, TensorBatches(test.images, test.labels, 500)), 4),
            "base_test_top1": load_card(base)["test_top1"],
            "params": sum(p.numel() for p in model.parameters()),
            "macs": macs,
            "base_macs": base_macs,
            "macs_reduction": round(1 - macs / base_macs, 4),
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            # the card is the model's manifest: command, recipe, versions and file hashes
            "versions": versions(),
            "sha256": sha256_file(weights_tmp),
            "files": [plan_tmp.name, weights_tmp.name],
        }
        (staged / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
        for fname in files:  # same file system: a temporary name beside, then rename
            tmp_path = temp_file(target / fname)
            shutil.copyfile(staged / fname, tmp_path)
            os.replace(tmp_path, target / fname)
        return card
