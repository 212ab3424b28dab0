from __future__ import annotations

import pytest
from torch import nn

from edgeslim.quant import QuantConfig, QuantConfigError, QuantSpec
from edgeslim.quant.config import check_selectors, resolve

W4 = QuantConfig(QuantSpec(bits=4))
W2 = QuantConfig(QuantSpec(bits=2))
W6 = QuantConfig(QuantSpec(bits=6))
W3 = QuantConfig(QuantSpec(bits=3))
DEFAULT = QuantConfig()


def test_selector_priority_exact_glob_regex_type_default() -> None:
    select = {
        "layer1.0.conv1": W4,
        "layer1.*": W2,
        "re:conv2$": W6,
        nn.Linear: W3,
        "layer3.*": None,
    }
    conv, lin = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    assert resolve("layer1.0.conv1", conv, select, DEFAULT) is W4  # exact beats glob
    assert resolve("layer1.0.conv2", conv, select, DEFAULT) is W2  # glob beats regex
    assert resolve("layer2.0.conv2", conv, select, DEFAULT) is W6  # regex
    assert resolve("fc", lin, select, DEFAULT) is W3  # type
    assert resolve("layer3.1.conv1", conv, select, DEFAULT) is None  # None skips
    assert resolve("layer2.0.conv1", conv, select, DEFAULT) is DEFAULT
    assert resolve("fc", lin, {"type:Linear": W4}, DEFAULT) is W4


def test_unmatched_selectors_are_reported() -> None:
    names = ["layer1.0.conv1", "fc"]
    assert check_selectors({"layer9.*": W4, "re:^fc$": W4, "fc": W4}, names) == ["layer9.*"]


def test_specs_validate_and_round_trip() -> None:
    cfg = QuantConfig(QuantSpec(bits=3, quantizer="pow2"), QuantSpec(bits=8, symmetric=False))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(QuantConfigError, match=r"bits must be an integer in 1\.\.8"):
        QuantSpec(bits=9)
    with pytest.raises(QuantConfigError, match=r"unknown quantizer 'int3'; valid: .*uniform"):
        QuantSpec(quantizer="int3")
    with pytest.raises(QuantConfigError, match=r"unknown estimator 'magic'; valid: .*ste"):
        QuantSpec(estimator="magic")
    with pytest.raises(QuantConfigError, match="granularity must be one of"):
        QuantSpec(granularity="row")  # type: ignore[arg-type]
    with pytest.raises(QuantConfigError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"bitz": 4})
