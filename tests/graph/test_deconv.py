"""A non-overlapping transposed conv is a 1x1 conv and a pixel shuffle: equal outputs, and
quantized, the pair runs on ONNX Runtime's integer kernels where ConvTranspose cannot."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.graph.deconv import ShuffleConvTranspose, rewritable, shuffle_transposed_convs
from edgeslim.quant import QuantConfig, QuantSpec
from edgeslim.quant.ptq import ptq


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 12), cout=st.integers(1, 12), k=st.integers(1, 4), bias=st.booleans(),
    h=st.integers(1, 6), w=st.integers(1, 6),
)  # fmt: skip
def test_the_shuffled_pair_equals_the_transposed_conv(
    cin: int, cout: int, k: int, bias: bool, h: int, w: int
) -> None:
    torch.manual_seed(cin * 100 + cout * 10 + k)
    deconv = nn.ConvTranspose2d(cin, cout, k, stride=k, bias=bias)
    x = torch.randn(2, cin, h, w)
    pair = ShuffleConvTranspose.from_transposed(deconv)
    torch.testing.assert_close(pair(x), deconv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "deconv",
    [
        nn.ConvTranspose2d(4, 4, 3, stride=2),  # overlapping windows
        nn.ConvTranspose2d(4, 4, 2, stride=2, padding=1),
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
        nn.ConvTranspose2d(4, 4, 2, stride=2, output_padding=1, dilation=2),
        nn.ConvTranspose2d(4, 4, (2, 1), stride=(2, 1)),
        nn.ConvTranspose1d(4, 4, 2, stride=2),
    ],
)
def test_overlapping_or_unusual_transposed_convs_are_left_alone(deconv: nn.Module) -> None:
    assert not rewritable(deconv)
    model = nn.Sequential(deconv)
    assert shuffle_transposed_convs(model) == [] and model[0] is deconv


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.dec(torch.cat([self.up(self.mid(skip)), skip], 1))


# 7-bit weights (reduce_range): ONNX Runtime's int8 kernels then compute as torch on every
# x86 CPU; full-range weights saturate 16-bit sums on CPUs without VNNI (7% off here)
W8A8 = QuantConfig(QuantSpec(bits=7), QuantSpec(bits=8, granularity="tensor", symmetric=False))


def test_rewritten_then_quantized_a_decoder_runs_on_integer_kernels_only(tmp_path: Path) -> None:
    from edgeslim.export.verify import export_module
    from edgeslim.runtime.kernels import kernel_coverage
    from edgeslim.runtime.ort import ort_fused_ops, ort_session

    torch.manual_seed(0)
    model = _Decoder().eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = ptq(model, W8A8, x)  # PTQ alone keeps the transposed conv
    assert isinstance(plain.get_submodule("up"), nn.ConvTranspose2d)
    rewritten = copy.deepcopy(model)
    assert shuffle_transposed_convs(rewritten) == ["up"]
    gm = ptq(rewritten, W8A8, x)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in gm.modules())
    (shuffle,) = [n for n in gm.graph.nodes if n.target == "up.shuffle"]
    (after,) = shuffle.users
    assert shuffle.args[0].target == after.target  # one quantizer serves both sides
    path = export_module(copy.deepcopy(gm), (x[:1],), tmp_path / "m.onnx", {})
    ops = ort_fused_ops(path)
    # the shuffle runs on uint8 codes: the only DequantizeLinear left is the output's
    assert "ConvTranspose" not in ops and ops.get("DequantizeLinear", 0) <= 1, ops
    assert kernel_coverage(path, (x[:1].numpy(),)).int8_mac_share == 1.0
    sess = ort_session(path)
    for i in (0, 7):  # checked on more than one input
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1].numpy()})
        with torch.no_grad():
            ref = gm(x[i : i + 1]).numpy()
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()
