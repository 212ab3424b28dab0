"""quantize_ / calibrate on real data (shipped resnet20, Fashion-MNIST)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeslim.data import load_fashion_mnist
from edgeslim.quant import (
    QuantConfig,
    QuantConfigError,
    QuantSpec,
    calibrate,
    quant_layers,
    quantize_,
    w8a8,
)
from edgeslim.quant.modules import QuantConv2d, QuantLinear
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


def test_prepare_keeps_fqns_and_state_dict_keys() -> None:
    model = load_zoo_model("resnet20")
    keys = set(model.state_dict())
    chosen = quantize_(model, QuantConfig(QuantSpec(bits=8)), select={"fc": None})
    assert "fc" not in chosen and len(chosen) == 21
    assert isinstance(model.layer1[0].conv1, QuantConv2d) and isinstance(model.fc, nn.Linear)
    assert keys <= set(model.state_dict())


def test_w8a8_ptq_keeps_accuracy_on_real_data() -> None:
    model = load_zoo_model("resnet20")
    test = load_fashion_mnist("test", limit=2000)
    fp32 = evaluate(model, test)
    q = copy.deepcopy(model)
    quantize_(q, w8a8())
    with pytest.raises(RuntimeError, match="calibrate"):
        evaluate(q, test)
    val = load_fashion_mnist("val", limit=256)
    assert calibrate(q, [val.images[i : i + 64] for i in range(0, 256, 64)], progress=False) == 4
    assert abs(evaluate(q, test) - fp32) <= 0.5


def test_low_bits_hurt_more_than_high_bits() -> None:
    model = load_zoo_model("resnet20")
    test = load_fashion_mnist("test", limit=1000)
    acc = {}
    for bits in (8, 2):
        q = copy.deepcopy(model)
        quantize_(q, QuantConfig(QuantSpec(bits=bits)))
        acc[bits] = evaluate(q, test)
    assert acc[8] > acc[2] + 5


def test_unsupported_layers_warn_and_nan_weights_are_refused() -> None:
    model = nn.Sequential(nn.ConvTranspose3d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"left in float: 0 \(ConvTranspose3d\)"):
        quantize_(model, QuantConfig(QuantSpec(bits=8)))
    assert isinstance(model[2], QuantLinear) and len(quant_layers(model)) == 1
    bad = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    with pytest.raises(QuantConfigError, match=r"layer 1 .* NaN or Inf"):
        quantize_(bad, QuantConfig(QuantSpec(bits=8)))
    assert not quant_layers(bad)  # refused before anything changed


class DepthwiseConv(nn.Conv2d):
    """Hugging Face style: a Conv2d subclass that only fixes its ``__init__`` arguments."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels, bias=False)


class OwnForward(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_a_subclass_computing_its_base_layer_is_quantized_as_that_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), DepthwiseConv(4), OwnForward(4, 2, 1))
    x = torch.randn(2, 1, 8, 8)
    want = model(x)
    with pytest.warns(UserWarning, match=r"left in float: 2 \(OwnForward\)"):
        quantize_(model, QuantConfig(QuantSpec(bits=8)))
    assert isinstance(model[1], QuantConv2d) and model[1].groups == 4
    assert type(model[2]) is OwnForward  # its own forward: not replaced
    torch.testing.assert_close(model(x), want, rtol=0.05, atol=0.05)
