"""YAML recipes: a list of stages, each with a ``kind`` registered by the module that runs it."""

from edgeslim.recipe.schema import (
    STAGES,
    Recipe,
    Stage,
    StageContext,
    load_recipe,
    parse_recipe,
    parse_recipe_text,
    register_stage,
)

__all__ = [
    "STAGES",
    "Recipe",
    "Stage",
    "StageContext",
    "load_recipe",
    "parse_recipe",
    "parse_recipe_text",
    "register_stage",
]
