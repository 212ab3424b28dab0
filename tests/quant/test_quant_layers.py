"""Conv twins beyond Conv2d (1d, 3d, transposed; grouped, depthwise, dilated), BatchNorm folding
after them, and the warnings/errors for layers that stay float."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from edgeslim.quant import QuantConfig, QuantSpec, fold_batchnorm, quant_layers, quantize_
from edgeslim.quant.config import w8a8
from edgeslim.quant.modules import (
    QuantConv1d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    in_major,
    out_major,
)
from edgeslim.quant.ptq import ptq
from edgeslim.quant.spec import QuantConfigError

# W8A8 with calibrated per-tensor activations and per-channel weights, on random inputs
MAX_REL_L2 = 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Wrap(nn.Module):
    """One layer between ReLUs, so activations are quantized on both sides (as in a net)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x))


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(8, 16, 3, padding=1), (8, 32)),
    "conv1d_dilated_grouped": (
        lambda: nn.Conv1d(8, 16, 3, padding=2, dilation=2, groups=4),
        (8, 32),
    ),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), (8, 10, 10)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 10, 10)),
    "conv2d_dilated": (lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2), (8, 10, 10)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (4, 6, 6, 6)),
    "convT1d": (lambda: nn.ConvTranspose1d(8, 16, 4, stride=2, padding=1), (8, 16)),
    "convT2d": (
        lambda: nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, output_padding=1),
        (8, 8, 8),
    ),
    "convT2d_grouped": (lambda: nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), (8, 8, 8)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_w8a8_layer_is_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    model = Wrap(make()).eval()
    calib = torch.randn(64, *shape)
    q = ptq(model, w8a8(), calib)
    twin = q.get_submodule("layer")
    assert type(twin).__name__ == "Quant" + type(model.layer).__name__
    x = torch.randn(16, *shape)
    with torch.no_grad():
        err = _rel(q(x), model(x))
    assert err < MAX_REL_L2, f"{name}: relative L2 error {err:.4f}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_twin_with_quantization_off_is_the_float_layer(name: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    model = Wrap(make()).eval()
    q = Wrap(make()).eval()
    q.load_state_dict(model.state_dict())
    quantize_(q, QuantConfig(weight=None, activation=None), select={"layer": QuantConfig()})
    q.layer.mode = "float"  # type: ignore[union-attr]
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-6)
    assert set(dict(q.named_parameters())) == set(dict(model.named_parameters()))  # FQNs kept


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_weight_is_quantized_per_output_channel(groups: int) -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, groups=groups)
    w = conv.weight.detach()
    torch.testing.assert_close(in_major(out_major(w, groups), groups), w, rtol=0, atol=0)
    with torch.no_grad():  # scale output channel 1 up: only its own scale may grow
        if groups == 1:
            conv.weight[:, 1] *= 100
        else:
            conv.weight[:2, 1] *= 100  # output channel 1 lives in group 0, column 1
    q = QuantConvTranspose2d.from_float(conv, QuantConfig(QuantSpec(bits=8)))
    assert q.weight_quantizer is not None
    scale = q.weight_quantizer.scale.detach().reshape(-1)
    assert scale.numel() == 6 and int(scale.argmax()) == 1
    assert float(scale[1]) > 20 * float(scale[[0, 2, 3, 4, 5]].max())


def test_conv1d_and_transposed_batchnorm_fold() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.ConvTranspose1d(8, 6, 3, groups=2), nn.BatchNorm1d(6),
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        want = model(x)
    pairs = fold_batchnorm(model)
    assert pairs == [("0", "1"), ("3", "4")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    conv3 = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)).eval()
    conv3[1].running_mean.normal_()  # type: ignore[union-attr]
    x3 = torch.randn(2, 2, 5, 5, 5)
    with torch.no_grad():
        want3 = conv3(x3)
    assert fold_batchnorm(conv3) == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(conv3(x3), want3, rtol=1e-5, atol=1e-5)


def test_conv_twins_are_registered() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 2, 1), nn.Conv3d(2, 2, 1), nn.ConvTranspose1d(2, 2, 1), nn.Linear(2, 2)
    )
    quantize_(model, QuantConfig(QuantSpec(bits=8)))
    kinds = [QuantConv1d, QuantConv3d, QuantConvTranspose1d]
    assert [type(model[i]) for i in range(3)] == kinds and len(quant_layers(model)) == 4


def test_layer_without_twin_warns_with_name_type_and_how_to_silence() -> None:
    model = nn.Sequential(nn.ConvTranspose3d(2, 2, 1), nn.Linear(2, 2))
    with pytest.warns(UserWarning) as record:
        quantize_(model, QuantConfig(QuantSpec(bits=8)))
    text = " ".join(str(r.message) for r in record)
    assert "0 (ConvTranspose3d)" in text and "select: {0: null}" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the advice works: no warning once selected None
        quantize_(nn.Sequential(nn.ConvTranspose3d(2, 2, 1)), select={"0": None})


def test_unsupported_attention_reason_is_named() -> None:
    """Packed self-attention is quantized (see test_attention.py); separate k/v sizes are
    not, and the warning names the layer and why."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention\).*separate q/k/v"):
        quantize_(model, QuantConfig(QuantSpec(bits=8)))


def test_ptq_with_nothing_quantizable_names_the_float_layers() -> None:
    model = nn.Sequential(nn.ConvTranspose3d(2, 2, 1), nn.ReLU(), nn.Linear(1, 3))
    calib = torch.randn(8, 2, 1, 1, 1)
    with pytest.raises(QuantConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptq(model, w8a8(), calib, select={"2": None})
    msg = str(info.value)
    assert "activation quantization was requested" in msg
    assert "0 (ConvTranspose3d: no quantized implementation" in msg
    assert "2 (Linear: selected None" in msg and "a_bits: null" in msg


def test_ptq_of_a_conv1d_only_model_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)).eval()
    x = torch.randn(32, 3, 20)
    q = ptq(model, w8a8(), x)
    with torch.no_grad():
        assert _rel(q(x), model(x)) < MAX_REL_L2
