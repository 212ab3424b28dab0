"""The recipe schema (pydantic) and the registry of stage kinds.

A recipe is data::

    name: resnet20-finetune
    stages:
      - kind: finetune
        epochs: 1

Each stage kind is a frozen pydantic model (its fields and their allowed values) plus a
handler ``(model, stage, context) -> model``, registered with :func:`register_stage` by
the module that implements it. Validation errors name the field path
(``stages[0].epochs``) and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from edgeslim.errors import RecipeError, TaskError

if TYPE_CHECKING:
    from edgeslim.task import Task


class Stage(BaseModel):
    """Base of every stage kind: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


@dataclass
class StageContext:
    """What a stage may use besides the model: the task (its data), the output directory
    and a log of notes."""

    out: Path
    model_name: str
    quick: bool = False
    notes: list[str] = field(default_factory=list)
    data_used: str = "none"
    task: Task | None = None

    def need_task(self, stage: str) -> Task:
        """The task, or a clear error naming the stage that needs data."""
        if self.task is None:
            raise TaskError(f"the {stage} stage needs a task (data) and none was given")
        return self.task


StageHandler = Callable[[nn.Module, Any, StageContext], nn.Module]


@dataclass(frozen=True)
class StageKind:
    schema: type[Stage]
    handler: StageHandler
    data_used: str


STAGES: dict[str, StageKind] = {}


def register_stage(
    kind: str, schema: type[Stage], data_used: str = "none"
) -> Callable[[StageHandler], StageHandler]:
    """Register a stage kind: its schema and (as decorator target) its handler."""

    def add(handler: StageHandler) -> StageHandler:
        if kind in STAGES:
            raise ValueError(f"stage kind {kind!r} is already registered")
        STAGES[kind] = StageKind(schema, handler, data_used)
        return handler

    return add


class Recipe(BaseModel):
    """A named list of stages run in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEYS: ClassVar[tuple[str, ...]] = ("name", "description", "stages")
    name: str = "recipe"
    description: str = ""
    stages: tuple[Stage, ...] = ()


def _load_builtin_stages() -> None:
    import edgeslim.stages  # noqa: F401  (registers "finetune", "quantize", "prune", ...)


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _explain(exc: ValidationError, prefix: str, schema: type[BaseModel]) -> str:
    msgs = []
    for err in exc.errors():
        where = _loc(prefix, tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in schema.model_fields if k != "kind")
            msgs.append(f"{where}: unknown field; allowed fields: {allowed or '(none)'}")
        else:
            msgs.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(msgs)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe data (already parsed from YAML/JSON); raise :class:`RecipeError`."""
    _load_builtin_stages()
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys name, description, stages")
    unknown = [k for k in data if k not in Recipe.KEYS]
    if unknown:
        raise RecipeError(
            f"{source}: unknown top-level field {unknown[0]!r}; allowed: {', '.join(Recipe.KEYS)}"
        )
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise RecipeError(f"{source}: stages must be a list of mappings, each with a kind")
    stages: list[Stage] = []
    kinds = ", ".join(sorted(STAGES))
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise RecipeError(f"{source}: {where} must be a mapping with a kind; kinds: {kinds}")
        kind = raw["kind"]
        if kind not in STAGES:
            raise RecipeError(
                f"{source}: {where}.kind: {kind!r} is not a stage kind; allowed values: {kinds}"
            )
        schema = STAGES[kind].schema
        try:
            stages.append(schema.model_validate(raw))
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_explain(exc, where, schema)}") from None
        except (ValueError, KeyError) as exc:  # a stage's own checks (e.g. registry names)
            raise RecipeError(f"{source}: {where}: {exc}") from None
    try:
        return Recipe(
            name=data.get("name", "recipe"),
            description=data.get("description", ""),
            stages=tuple(stages),
        )
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_explain(exc, '', Recipe)}") from None


def load_recipe(path: Path) -> Recipe:
    """Load a YAML recipe file (``yaml.safe_load``: no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    return parse_recipe(data, source=str(path))
