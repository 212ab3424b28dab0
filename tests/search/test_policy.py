"""Policies: JSON round trip, stable ids, clear validation errors, deterministic apply, and
analytic costs that match numbers worked out by hand from the layer shapes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.data import load_digits_split
from edgeslim.quant.modules import QuantMixin
from edgeslim.search import Policy, PolicyError, SearchError, SearchSpace, load_policy
from edgeslim.search.space import model_fingerprint
from edgeslim.task import Task


def _mixed(space: SearchSpace) -> Policy:
    return space.uniform(4).replace(w_bits={"conv1": 8, "fc": 2}, keep={"conv2": 0.5, "conv4": 0.5})


def test_round_trip_through_json_and_files(space: SearchSpace, tmp_path: Path) -> None:
    policy = _mixed(space)
    again = Policy.from_json(policy.to_json())
    assert again == policy and again.id == policy.id and hash(again) == hash(policy)
    path = policy.save(tmp_path / "p" / "policy.json")
    assert load_policy(path, space) == policy
    data = json.loads(path.read_text())
    assert data["layers"]["conv1"] == {"w_bits": 8, "a_bits": 8}
    assert data["keep"]["conv2"] == 0.5 and data["keep"]["conv1"] == 1.0


def test_id_depends_on_content_only() -> None:
    a = Policy.of({"b": 4, "a": 8}, {"a": 8, "b": None}, {"g": 0.5})
    b = Policy.of({"a": 8, "b": 4}, {"b": None, "a": 8}, {"g": 0.5})
    assert a == b and a.id == b.id
    # the id is a hash of canonical JSON: journals written today must resolve tomorrow
    assert a.id == "53ab031776352ed8"
    assert a.replace(w_bits={"a": 4}).id != a.id
    assert a.replace(keep={"g": 0.75}).id != a.id


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.data())
def test_genes_and_json_round_trip(space: SearchSpace, data: st.DataObject) -> None:
    genes = tuple(data.draw(st.integers(0, len(d.choices) - 1)) for d in space.dims)
    policy = space.decode(genes)
    assert space.encode(policy) == genes
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda d: d["layers"].update(conv9={"w_bits": 8, "a_bits": 8}),
            ["layers['conv9']", "conv1"],
        ),
        (lambda d: d["layers"].pop("fc"), ["lacks layer 'fc'"]),
        (lambda d: d["layers"]["fc"].update(w_bits=9), ["layers['fc'].w_bits", "1..8", "9"]),
        (lambda d: d["layers"]["fc"].update(w_bits=6), ["layers['fc'].w_bits is 6", "2, 4, 8"]),
        (lambda d: d["layers"]["fc"].update(a_bits="8"), ["layers['fc'].a_bits", "null"]),
        (lambda d: d["layers"]["fc"].update(scale=2), ["layers['fc']", "w_bits"]),
        (lambda d: d["keep"].update(conv2=1.5), ["keep['conv2']", "[0, 1]"]),
        (lambda d: d["keep"].update(conv2=0.0), ["keep['conv2'] is 0", "0.5, 1"]),
        (lambda d: d["keep"].update(conv2=0.6), ["keep['conv2'] is 0.6", "0.5, 1"]),
        (lambda d: d["keep"].update(fc=1.0), ["keep['fc']", "allowed groups", "conv4"]),
        (lambda d: d.update(format="other"), ["'format'", "edgeslim-search-policy"]),
        (lambda d: d.update(version=7), ["'version'", "1"]),
        (lambda d: d.update(bits=8), ["unknown policy field", "layers, keep"]),
    ],
)
def test_invalid_policies_name_the_field_and_allowed_values(
    space: SearchSpace, tmp_path: Path, edit: object, words: list[str]
) -> None:
    data = _mixed(space).to_dict()
    del data["id"]
    assert callable(edit)
    edit(data)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PolicyError) as err:
        load_policy(path, space)
    for w in words:
        assert w in str(err.value)
    assert str(path) in str(err.value)


def test_hand_edited_id_and_bad_json_are_refused(space: SearchSpace) -> None:
    data = _mixed(space).to_dict()
    data["layers"]["fc"]["w_bits"] = 4
    with pytest.raises(PolicyError, match="edited by hand"):
        Policy.from_dict(data)
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{")


def test_uniform_policies(space: SearchSpace) -> None:
    assert space.uniform(4).describe() == "W4A8"
    assert space.uniform(8, keep=0.5).describe() == "W8A8, keep 0.5"
    assert space.uniform() == space.least_compressed()
    assert space.uniform(2, keep=0.5) == space.most_compressed()
    assert len(space.uniforms()) == 3 * 2
    with pytest.raises(PolicyError, match="allowed values: 2, 4, 8"):
        space.uniform(5)


def _outputs(model: nn.Module) -> torch.Tensor:
    x = load_digits_split("test").images[:64]
    with torch.no_grad():
        return model(x)


def test_apply_is_deterministic_and_follows_the_policy(space: SearchSpace) -> None:
    before = model_fingerprint(space.model)
    policy = _mixed(space)
    a, b = space.apply(policy), space.apply(policy)
    assert torch.equal(_outputs(a), _outputs(b))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    quant = {n: m for n, m in a.named_modules() if isinstance(m, QuantMixin)}
    assert {n: m.qconfig.weight.bits for n, m in quant.items() if m.qconfig.weight} == (
        policy.weight_bits
    )
    assert a.get_submodule("conv2").out_channels == 8  # keep 0.5 of 16
    assert a.get_submodule("conv4").out_channels == 16  # keep 0.5 of 32
    assert a.get_submodule("conv1").out_channels == 16  # kept whole
    assert model_fingerprint(space.model) == before  # the model itself is never changed
    # a different policy gives a different model
    assert not torch.equal(_outputs(a), _outputs(space.apply(space.uniform(4))))


def test_mixed_activation_bits_keep_per_layer_quantizers(
    digits_model: nn.Module, digits_task: Task
) -> None:
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(8,), a_bits=(4, 8), keep=(1.0,))
    policy = sp.uniform().replace(a_bits={"conv2": 4})
    model = sp.apply(policy)
    bits = {
        n: m.input_quant.spec.bits
        for n, m in model.named_modules()
        if isinstance(m, QuantMixin) and m.input_quant is not None
    }
    assert bits == {"conv1": 8, "conv2": 4, "conv3": 8, "conv4": 8, "fc": 8}
    assert torch.isfinite(_outputs(model)).all()


def test_costs_match_hand_computed_numbers(space: SearchSpace) -> None:
    base = space.baseline_costs()
    spatial = 8 * 8
    conv = 16 * 16 * 9 * spatial  # conv2 and conv3 at full width
    macs = 16 * 9 * spatial + 2 * conv + 32 * 16 * 9 * 16 + 32 * 10
    assert base.macs == macs and base.bops == macs * 32 * 32
    weights = {"conv1": 16 * 9, "conv2": 16 * 16 * 9, "conv3": 16 * 16 * 9,
               "conv4": 32 * 16 * 9, "fc": 32 * 10}  # fmt: skip
    others = 16 + 16 + 16 + 32 + 10 + 2 * (16 + 16 + 16 + 32)  # biases, BN weight + bias
    assert base.size == 4 * (sum(weights.values()) + others)
    w4 = space.costs(space.uniform(4))
    assert w4.size == sum(weights.values()) // 2 + 4 * others
    assert w4.bops == macs * 4 * 8 and w4.macs == macs
    assert w4.memory == base.memory // 4  # 8-bit activations
    # conv2 keeps 8 of 16 channels: its MACs and conv3's halve
    half = space.costs(space.uniform(4).replace(keep={"conv2": 0.5}))
    assert half.macs == macs - conv
    table = space.layer_table(space.uniform(4).replace(keep={"conv2": 0.5}))
    assert table["conv2"].macs == table["conv3"].macs == conv // 2
    # conv2 loses 8 rows and conv3 8 input columns (4-bit), conv2 8 biases and 16 BN params
    assert half.size == w4.size - 2 * (8 * 16 * 9) // 2 - 4 * (8 + 16)
    assert half.size < w4.size


def test_space_refuses_bad_choices(digits_model: nn.Module, digits_task: Task) -> None:
    with pytest.raises(SearchError, match="w_bits choice 9"):
        SearchSpace.build(digits_model, digits_task, w_bits=(4, 9))
    with pytest.raises(SearchError, match="keep ratios must be in"):
        SearchSpace.build(digits_model, digits_task, keep=(0.0, 1.0))
    with pytest.raises(SearchError, match=r"exclude: 'head\.\*' matches no quantizable layer"):
        SearchSpace.build(digits_model, digits_task, exclude=["head.*"])
    sp = SearchSpace.build(digits_model, digits_task, exclude=["fc"], skip=["conv4"])
    assert [lc.fqn for lc in sp.layers] == ["conv1", "conv2", "conv3", "conv4"]
    # conv4 reads the residual group (conv1, conv3) and writes its own: both stay whole
    assert [g.key for g in sp.groups] == ["conv2"]
    assert "conv4" not in sp.uniform().keep


def test_zoo_resnet20_space_costs() -> None:
    """The shipped resnet20 checkpoint: 8-bit weights are a quarter of the fp32 bytes (plus
    float BN/bias parameters), BOPs 1/16, and keeping half of every group's channels
    removes most of the MACs, all without running the model on data."""
    from edgeslim.zoo import resolve_model

    model = resolve_model("resnet20")
    task = Task(example_inputs=(torch.zeros(1, 1, 28, 28),), name="shape-only")
    sp = SearchSpace.build(model, task, w_bits=(4, 8), keep=(0.5, 1.0))
    assert len(sp.layers) >= 20 and len(sp.groups) >= 10
    base = sp.baseline_costs()
    w8 = sp.costs(sp.uniform(8))
    assert w8.bops * 16 == base.bops
    assert 0.25 < w8.size / base.size < 0.27
    halved = sp.costs(sp.uniform(8, keep=0.5))
    assert 0.2 < halved.macs / base.macs < 0.35
    assert halved.memory < w8.memory


def test_keep_ratios_that_leave_one_width_are_one_choice(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """round_to 16 merges 0.5/0.75/1 of the 16-wide groups into one width and 0.75/1 of the
    32-wide one: only distinct widths are searched, and a merged ratio encodes to its twin."""
    space = SearchSpace.build(
        digits_model, digits_task, w_bits=(8,), keep=(0.5, 0.75, 1.0), round_to=16
    )
    assert [(d.name, d.choices) for d in space.dims] == [("conv4", (0.5, 1.0))]
    widths = {space.layer_table(space.decode(g))["fc"].in_shape[-1] for g in itertools.product(
        *(range(len(d.choices)) for d in space.dims))}  # fmt: skip
    assert widths == {16, 32}  # every gene a different model
    merged = space.uniform(8, keep=0.75)
    twin = space.decode(space.encode(merged))
    assert twin.keep["conv4"] == 1.0 and twin.keep["conv1"] == 1.0
    assert space.layer_table(twin) == space.layer_table(merged)
    fine = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 0.75, 1.0))
    assert [len(d.choices) for d in fine.dims] == [3, 3, 3]  # round_to 1: nothing merges
