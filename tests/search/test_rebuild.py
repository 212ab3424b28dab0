"""A searched policy's model rebuilt from its JSON structure and the saved state alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from search_helpers import encoder_and_tokens
from torch import nn

from edgeslim.artifacts import fit_state
from edgeslim.checkpoint import load_checked
from edgeslim.search import Policy, SearchError, SearchSpace
from edgeslim.search.rebuild import rebuild_structure
from edgeslim.search.space import DEPTH_PREFIX
from edgeslim.task import Task


def _rebuilt(space: SearchSpace, source: nn.Module, policy: Policy) -> tuple[nn.Module, nn.Module]:
    """(the model ``space.apply`` gives, the one rebuilt from a JSON round trip of its
    structure on a fresh copy of ``source`` with the applied model's state loaded)."""
    applied = space.apply(policy)
    data = json.loads(json.dumps(space.structure(policy)))
    fresh = copy.deepcopy(source)
    rebuilt = rebuild_structure(fresh, data, space.task.example_inputs)
    state = dict(applied.state_dict())
    fit_state(rebuilt, state)
    load_checked(rebuilt, state, "applied")
    return applied, rebuilt.eval()


def _same(a: nn.Module, b: nn.Module, task: Task) -> None:
    batch = torch.cat([x[0] for x in task.calibration_batches(64)])[:32]
    with torch.no_grad():
        assert torch.equal(a(batch), b(batch))


@pytest.mark.parametrize("mixed_acts", [False, True])
def test_a_pruned_mixed_bit_policy_rebuilds_bit_exactly(
    digits_model: nn.Module, digits_task: Task, mixed_acts: bool
) -> None:
    a_bits = (8, None) if mixed_acts else (8,)
    space = SearchSpace.build(
        digits_model, digits_task, w_bits=(4, 8), a_bits=a_bits, keep=(0.5, 1.0)
    )
    base = space.uniform(8, 8, 1.0)
    first, *_, last = [layer.fqn for layer in space.layers]
    group = space.channel_groups[0].key
    acts = {last: None} if mixed_acts else {}
    policy = base.replace(w_bits={first: 4}, a_bits=acts, keep={group: 0.5})
    structure = space.structure(policy)
    assert structure["plan"] is not None  # channels cut: a plan with kept indices
    assert structure["edges"] is not mixed_acts  # one activation precision: on the edges
    applied, rebuilt = _rebuilt(space, digits_model, policy)
    _same(applied, rebuilt, digits_task)


def test_a_removed_branch_rebuilds(digits_model: nn.Module, digits_task: Task) -> None:
    space = SearchSpace.build(digits_model, digits_task, w_bits=(4, 8), keep=(1.0,), depth=True)
    (branch,) = [g.key for g in space.groups if g.key.startswith(DEPTH_PREFIX)]
    policy = space.uniform(8, 8, 1.0).replace(keep={branch: 0.0})
    assert space.structure(policy)["removed_branches"] == ["bn3"]
    applied, rebuilt = _rebuilt(space, digits_model, policy)
    _same(applied, rebuilt, digits_task)


def test_a_structure_for_another_model_is_refused(
    digits_model: nn.Module, digits_task: Task
) -> None:
    space = SearchSpace.build(digits_model, digits_task, w_bits=(4, 8), keep=(0.5, 1.0))
    data = space.structure(space.uniform(8, 8, 0.5))
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(SearchError, match="cannot be rebuilt"):
        rebuild_structure(other, data, digits_task.example_inputs)
    with pytest.raises(SearchError, match="not a searched model's structure"):
        rebuild_structure(copy.deepcopy(digits_model), {"format": "x"}, digits_task.example_inputs)


def test_pruned_attention_heads_rebuild_on_the_unsplit_model() -> None:
    model, x, task = encoder_and_tokens()
    space = SearchSpace.build(model, task, w_bits=(4, 8), keep=(0.5, 1.0))
    policy = space.uniform(8, 8, 0.5)
    structure = space.structure(policy)
    assert structure["split_attention"] and "enc.self_attn.q_proj" in structure["plan"]["keep"]
    applied, rebuilt = _rebuilt(space, model, policy)
    with torch.no_grad():
        assert torch.equal(applied(x[:8]), rebuilt(x[:8]))
