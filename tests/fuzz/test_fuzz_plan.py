"""Fuzz the prune-plan loader (JSON text and files) and applying a plan to a model: only a
``PlanError``, and a refused plan leaves the model untouched (no partial surgery)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from fuzzing import FUZZ, no_hang
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from edgeslim.errors import PlanError
from edgeslim.graph import analyze
from edgeslim.prune.plan import PrunePlan, apply_plan

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=15,
)


class Net(nn.Module):
    """Conv -> BN -> ReLU -> conv -> pool -> linear: two prunable groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


torch.manual_seed(0)
NET = Net().eval()
ARGS = (torch.randn(1, 1, 10, 10),)
GROUPS = analyze(NET, *ARGS).prunable_groups
VALID = PrunePlan.from_groups(NET, {g: list(range(0, g.size, 2)) for g in GROUPS}, ARGS, "net")


@st.composite
def plan_dicts(draw: st.DrawFn) -> Any:
    """The valid plan with some fields replaced, some keep lists edited, or pure noise."""
    data = VALID.to_dict()
    mode = draw(st.sampled_from(["replace", "keep", "noise"]))
    if mode == "noise":
        return draw(json_values)
    if mode == "replace":
        for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=3)):
            data[key] = draw(json_values)
        return data
    for key in list(data["keep"]):
        if draw(st.booleans()):
            data["keep"][key] = draw(st.lists(st.integers(-3, 12), max_size=10))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(data["sizes"])))
        data["sizes"][key] = draw(st.integers(-1, 20))
    return data


@FUZZ
@given(text=st.text(max_size=200) | plan_dicts().map(json.dumps))
def test_plan_json_gives_a_plan_or_a_plan_error(text: str) -> None:
    with no_hang():
        try:
            plan = PrunePlan.from_json(text)
        except PlanError:
            return
    assert PrunePlan.from_json(plan.to_json()) == plan  # what loads, round-trips


@FUZZ
@given(data=st.binary(max_size=200) | plan_dicts().map(lambda d: json.dumps(d).encode()))
def test_plan_file_gives_a_plan_or_a_plan_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.plan.json"
        path.write_bytes(data)
        with no_hang():
            try:
                PrunePlan.load(path)
            except PlanError as exc:
                assert str(path) in str(exc)


@FUZZ
@given(data=plan_dicts())
def test_a_refused_plan_leaves_the_model_untouched(data: Any) -> None:
    try:
        plan = PrunePlan.from_dict(data)
    except PlanError:
        return
    model = copy.deepcopy(NET)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with no_hang():
        try:
            apply_plan(model, plan, ARGS)
        except PlanError:
            after = model.state_dict()
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before)
            return
    assert model(*ARGS).shape == (1, 3)  # an accepted plan gives a working model
