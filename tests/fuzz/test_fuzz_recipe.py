"""Fuzz the recipe loader: any YAML text or file is a ``Recipe`` or a ``RecipeError``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from fuzzing import FUZZ, no_hang
from hypothesis import given
from hypothesis import strategies as st

from edgeslim.errors import RecipeError
from edgeslim.recipe import STAGES, Recipe, load_recipe, parse_recipe_text
from edgeslim.recipe.schema import _load_builtin_stages

_load_builtin_stages()
KINDS = sorted(STAGES)
FIELDS = sorted({f for k in KINDS for f in STAGES[k].schema.model_fields if f != "kind"})
WORDS = ["uniform", "pow2", "channel", "tensor", "group", "l1", "fpgm", "dfmpc", "ste", "lsq"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(KINDS + WORDS)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
stage = st.fixed_dictionaries(
    {"kind": st.sampled_from([*KINDS, "magic"])},
    optional={f: values for f in FIELDS[:40]},
)
recipes = st.fixed_dictionaries(
    {},
    optional={
        "name": values,
        "description": values,
        "stages": st.lists(stage | values, max_size=3),
        "stagez": values,
    },
)


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    """Well-formed recipes with wrong values, plain noise, and recipes with edits spliced in."""
    kind = draw(st.sampled_from(["structured", "noise", "mutated", "tags"]))
    if kind == "noise":
        return draw(st.text(max_size=200))
    if kind == "tags":  # YAML's own constructors: dates, binary, sets, anchors, python tags
        tag = draw(
            st.sampled_from(
                [
                    "!!timestamp",
                    "!!binary",
                    "!!int",
                    "!!float",
                    "!!set",
                    "!!python/object:os.system",
                ]
            )
        )
        return f"name: {tag} {draw(st.text(max_size=20))!r}\nstages: []\n"
    text = _dump(draw(recipes))
    if kind == "structured":
        return text
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + draw(st.text(max_size=6)) + text[j:]
    return text


def _check(text: str) -> None:
    with no_hang():
        try:
            r = parse_recipe_text(text, source="fuzz.yaml")
        except RecipeError as exc:
            assert str(exc).startswith("fuzz.yaml")
        else:
            assert isinstance(r, Recipe)


@FUZZ
@given(text=yaml_texts())
def test_recipe_text_gives_a_recipe_or_a_recipe_error(text: str) -> None:
    _check(text)


@FUZZ
@given(data=st.binary(max_size=300) | recipes.map(lambda d: _dump(d).encode("utf-16")))
def test_recipe_file_bytes_give_a_recipe_or_a_recipe_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(data)
        with no_hang():
            try:
                load_recipe(path)
            except RecipeError as exc:
                assert str(path) in str(exc)


def test_every_error_of_a_recipe_is_reported() -> None:
    text = _dump(
        {
            "name": "x",
            "stagez": 1,
            "stages": [
                {"kind": "quantize", "w_bits": 12, "granularity": "row"},
                {"kind": "magic"},
            ],
        }
    )
    try:
        parse_recipe_text(text, source="r.yaml")
    except RecipeError as exc:
        msg = str(exc)
    else:
        raise AssertionError("an invalid recipe was accepted")
    assert msg.startswith("r.yaml: 4 errors: ")
    assert "stages[0].w_bits" in msg and "allowed: an integer >= 1 and <= 8" in msg
    assert "stages[0].granularity" in msg and "allowed: one of tensor, channel, group" in msg
    assert "stages[1].kind: 'magic' is not a stage kind" in msg
    assert "unknown top-level field 'stagez'" in msg
