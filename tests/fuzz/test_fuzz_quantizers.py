"""Fuzz the quantizers: random settings give a ``QuantSpec`` or a ``QuantConfigError``; any
valid quantizer on any tensor (empty, 0-d, NaN, inf, huge) gives a same-shape result, finite
for finite input, or one of the project's errors (never an ``IndexError`` or a torch error)."""

from __future__ import annotations

import math
from typing import Any

import torch
from fuzzing import FUZZ, no_hang
from hypothesis import given
from hypothesis import strategies as st

from edgeslim.errors import EdgeslimError
from edgeslim.quant.registries import ESTIMATORS, OBSERVERS, QUANTIZERS, ensure_builtins
from edgeslim.quant.spec import QuantConfigError, QuantSpec

ensure_builtins()
FIELDS = list(QuantSpec.__dataclass_fields__)
NAMES = sorted({*QUANTIZERS.names(), *ESTIMATORS.names(), *OBSERVERS.names()})
junk = (
    st.none()
    | st.booleans()
    | st.integers(-5, 20)
    | st.floats()
    | st.text(max_size=5)
    | st.sampled_from([*NAMES, "tensor", "channel", "group", "token"])
    | st.lists(st.integers(), max_size=2)
)


@FUZZ
@given(data=st.dictionaries(st.sampled_from([*FIELDS, "bitz", 3]), junk, max_size=6) | junk)
def test_spec_from_any_mapping_is_a_spec_or_a_config_error(data: Any) -> None:
    with no_hang():
        try:
            spec = QuantSpec.from_dict(data)
        except QuantConfigError:
            return
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@st.composite
def valid_specs(draw: st.DrawFn) -> tuple[QuantSpec, bool]:
    name = draw(st.sampled_from(sorted(QUANTIZERS.names())))
    bits = draw(st.sampled_from(list(getattr(QUANTIZERS.get(name), "VALID_BITS", range(1, 9)))))
    is_weight = draw(st.booleans())
    spec = QuantSpec(
        quantizer=name,
        bits=bits,
        granularity=draw(st.sampled_from(["tensor", "channel", "group", "token"])),
        group_size=draw(st.integers(1, 9)),
        symmetric=draw(st.booleans()) if name == "uniform" else True,
    )
    return spec, is_weight


SPECIAL = [0.0, -0.0, 1e-45, 1e38, -1e38, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    n = math.prod(shape)
    vals = draw(
        st.lists(st.floats(-1e6, 1e6, width=32) | st.sampled_from(SPECIAL), min_size=n, max_size=n)
    )
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


@FUZZ
@given(spec=valid_specs(), x=tensors())
def test_quantizer_on_any_tensor_gives_a_result_or_a_project_error(
    spec: tuple[QuantSpec, bool], x: torch.Tensor
) -> None:
    s, is_weight = spec
    with no_hang():
        try:
            q = QUANTIZERS.get(s.quantizer)(s, is_weight=is_weight)
            q.init_range(x)
            y = q.quantize(x)
        except EdgeslimError:
            return
    assert y.shape == x.shape
    if bool(x.isfinite().all()):
        assert bool(y.isfinite().all()), "finite input must give finite output"
