"""Bias correction removes the per-channel output shift of weight rounding (real data)."""

from __future__ import annotations

import torch

from edgeslim.data import load_fashion_mnist
from edgeslim.quant import QuantConfig, QuantSpec
from edgeslim.quant.bias_correction import correct_bias
from edgeslim.quant.ptq import ptq
from edgeslim.zoo import load_zoo_model


def _shift(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean per-channel output difference: quantized minus float weights, same input."""
    with torch.no_grad():
        wq = layer.weight_quantizer.quantize(layer.weight)
        diff = layer._conv_forward(x, wq, None) - layer._conv_forward(x, layer.weight, None)
    return diff.mean(dim=(0, 2, 3))


def test_correction_cancels_the_mean_shift_and_keeps_accuracy() -> None:
    calib = load_fashion_mnist("val", limit=128).images
    model = ptq(load_zoo_model("mobilenetv2-small"), QuantConfig(QuantSpec(bits=3)), None)
    layer = model.get_submodule("features.2.conv.1.0")  # a depthwise conv: 9 weights/channel
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        model(calib)
    handle.remove()
    before = _shift(layer, feats[0]).abs().max()
    bias_before = layer.bias.detach().clone()
    assert correct_bias(model, [calib[:64], calib[64:]]) == 26
    assert before > 1e-3
    # the bias moved by exactly the measured shift (same input: the shift is a constant)
    assert torch.allclose(bias_before - layer.bias.detach(), _shift(layer, feats[0]), atol=1e-4)
