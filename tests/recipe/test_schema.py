from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.errors import RecipeError
from edgeslim.recipe import STAGES, load_recipe, parse_recipe


def test_valid_recipe_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: ft\nstages:\n  - kind: finetune\n    epochs: 2\n    lr: 0.005\n")
    recipe = load_recipe(path)
    assert recipe.name == "ft" and recipe.stages[0].kind == "finetune"
    assert recipe.stages[0].model_dump()["epochs"] == 2
    assert "finetune" in STAGES


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"stages": [{"kind": "magic"}]},
            "stages[0].kind: 'magic' is not a stage kind; "
            "allowed values: datafree, finetune, lowrank, prune, quantize",
        ),
        ({"stages": [{"kind": "finetune", "epochs": 0}]}, "stages[0].epochs"),
        (
            {"stages": [{"kind": "finetune", "epoch": 3}]},
            "stages[0].epoch: unknown field; allowed fields: epochs",
        ),
        ({"stages": [{"epochs": 3}]}, "stages[0] must be a mapping with a kind"),
        ({"stagez": []}, "unknown top-level field 'stagez'; allowed: name, description, stages"),
        ([1, 2], "a recipe is a mapping"),
    ],
)
def test_invalid_recipe_names_field_and_allowed_values(data: object, expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert expected in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [kind: finetune\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


def test_yaml_cannot_execute_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError):
        load_recipe(evil)


def test_shipped_example_recipes_are_valid() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        assert load_recipe(path).stages
