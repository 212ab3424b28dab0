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
from types import UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

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
    """What a stage may use besides the model: the task (its data), the output directory,
    a log of notes and the uncompressed model (``reference``: a teacher when the training
    data has no labels)."""

    out: Path
    model_name: str
    quick: bool = False
    notes: list[str] = field(default_factory=list)
    data_used: str = "none"
    task: Task | None = None
    reference: nn.Module | None = None

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


_TYPE_WORDS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
    tuple: "a list",
}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _describe_type(annotation: Any) -> str | None:
    """Plain words for a field type (``one of a, b``, ``an integer``), or None if exotic."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(annotation))
    if origin in (Union, UnionType):
        parts = [a for a in get_args(annotation) if a is not type(None)]
        words = [_describe_type(a) for a in parts]
        if any(w is None for w in words):
            return None
        text = " or ".join(w for w in words if w)
        return text + " or null" if len(parts) < len(get_args(annotation)) else text
    return _TYPE_WORDS.get(origin or annotation)


def _allowed(schema: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """What a top-level field of ``schema`` accepts: its type in words and its bounds."""
    if len(loc) != 1 or not isinstance(loc[0], str) or loc[0] not in schema.model_fields:
        return None
    info = schema.model_fields[loc[0]]
    words = _describe_type(info.annotation)
    if words is None:
        return None
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in info.metadata
        for attr, sign in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    nullable = words.endswith(" or null")
    words = words.removesuffix(" or null") + (f" {' and '.join(bounds)}" if bounds else "")
    return words + (", or null" if nullable else "")


def _explain(exc: ValidationError, prefix: str, schema: type[BaseModel]) -> list[str]:
    """One message per invalid field: where, what is wrong, what was given, what is allowed."""
    msgs = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = _loc(prefix, loc)
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in schema.model_fields if k != "kind")
            msgs.append(f"{where}: unknown field; allowed fields: {allowed or '(none)'}")
            continue
        msg = f"{where}: {err['msg']} (got {err.get('input')!r})"
        words = _allowed(schema, loc)
        if words is not None and "allowed" not in err["msg"]:
            msg += f"; allowed: {words}"
        msgs.append(msg)
    return msgs


def _refuse(source: str, errors: list[str]) -> RecipeError:
    """All the problems of a recipe in one paragraph, so one edit fixes them all."""
    if len(errors) == 1:
        return RecipeError(f"{source}: {errors[0]}")
    return RecipeError(f"{source}: {len(errors)} errors: " + "; ".join(errors))


def _parse_stage(i: int, raw: Any, errors: list[str]) -> Stage | None:
    """Validate one stage, appending its problems to ``errors``."""
    where = f"stages[{i}]"
    kinds = ", ".join(sorted(STAGES))
    if not isinstance(raw, dict) or "kind" not in raw:
        errors.append(f"{where} must be a mapping with a kind; kinds: {kinds}")
        return None
    kind = raw["kind"]
    if not isinstance(kind, str) or kind not in STAGES:
        errors.append(f"{where}.kind: {kind!r} is not a stage kind; allowed values: {kinds}")
        return None
    schema = STAGES[kind].schema
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        errors += _explain(exc, where, schema)
    except (ValueError, KeyError, TypeError) as exc:  # a stage's own checks (registry names)
        errors.append(f"{where}: {exc}")
    return None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe data (already parsed from YAML/JSON); raise :class:`RecipeError`
    listing every invalid field, not only the first."""
    _load_builtin_stages()
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys name, description, stages")
    errors = [
        f"unknown top-level field {k!r}; allowed: {', '.join(Recipe.KEYS)}"
        for k in data
        if k not in Recipe.KEYS
    ]
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        errors.append("stages must be a list of mappings, each with a kind")
        raw_stages = []
    stages = [_parse_stage(i, raw, errors) for i, raw in enumerate(raw_stages)]
    head = {"name": data.get("name", "recipe"), "description": data.get("description", "")}
    try:
        Recipe.model_validate(head)
    except ValidationError as exc:
        errors += _explain(exc, "", Recipe)
    if errors:
        raise _refuse(source, errors)
    return Recipe(**head, stages=tuple(s for s in stages if s is not None))


def load_recipe(path: Path) -> Recipe:
    """Load a YAML recipe file (``yaml.safe_load``: no code execution)."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; give a YAML file (e.g. recipe.yaml)")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise RecipeError(f"{path}: not a UTF-8 text file ({where})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_recipe_text(text, source=str(path))


def parse_recipe_text(text: str, source: str = "recipe") -> Recipe:
    """Parse and validate YAML text; any problem, including a value YAML itself rejects
    (an impossible date, nesting deeper than the parser allows), is a :class:`RecipeError`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise RecipeError(f"{source}: not valid YAML (nested too deeply)") from None
    except Exception as exc:  # PyYAML's constructors on odd values: a timestamp with month 13
        # (ValueError), `!!timestamp ''` (AttributeError); safe_load runs no user code
        raise RecipeError(f"{source}: not valid YAML ({type(exc).__name__}: {exc})") from None
    return parse_recipe(data, source=source)
