from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.graph import example_input, layer_table, total_macs
from edgeslim.zoo.resnet import resnet20


def analytic_resnet20_macs(h: int = 28) -> int:
    """Conv/linear MACs of ResNet-20 on an h x h single-channel input, written out by hand."""
    macs = h * h * 16 * 1 * 9  # stem
    size, in_ch = h, 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            out = (size + 2 - 3) // stride + 1
            macs += out * out * width * in_ch * 9  # conv1
            macs += out * out * width * width * 9  # conv2
            if stride != 1 or in_ch != width:
                macs += out * out * width * in_ch  # 1x1 downsample
            size, in_ch = out, width
    return macs + 64 * 10  # fc


def test_resnet20_macs_equal_analytic_count() -> None:
    table = layer_table(resnet20(), example_input())
    assert total_macs(table) == analytic_resnet20_macs() == 31_021_952
    assert table["layer2.0.conv1"].out_shape == (1, 32, 14, 14)
    assert table["fc"].params == 650


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 6),
    cout=st.integers(1, 6),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    groups_div=st.booleans(),
    h=st.integers(5, 12),
)
def test_conv_macs_formula(
    cin: int, cout: int, k: int, stride: int, groups_div: bool, h: int
) -> None:
    groups = cin if groups_div and cout % cin == 0 else 1
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)
    model = nn.Sequential(conv)
    table = layer_table(model, torch.randn(2, cin, h, h))
    out = (h + 2 * (k // 2) - k) // stride + 1
    assert table["0"].macs == 2 * out * out * cout * (cin // groups) * k * k


class ChannelsFirstAttention(nn.Module):
    """SqueezeBERT's self-attention: 1x1 Conv1d projections on ``(B, C, T)``, with the
    attributes of a BERT-style module."""

    def __init__(self, channels: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, channels // heads
        self.query, self.key, self.value = (nn.Conv1d(channels, channels, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        h, d = self.num_attention_heads, self.attention_head_size
        q, k, v = (p(x).view(b, h, d, t) for p in (self.query, self.key, self.value))
        scores = (q.transpose(2, 3) @ k).softmax(-1)  # (b, h, t, t)
        return (v @ scores.transpose(2, 3)).reshape(b, c, t)


def test_attention_products_are_counted_as_computed_whatever_the_layout() -> None:
    """Before, a formula read ``(B, T, C)`` from any module with BERT's attributes and
    counted 2 * 32 * 32 * 32 for this ``(1, 32, 12)`` input instead of 2 * 12 * 12 * 32."""
    table = layer_table(ChannelsFirstAttention(), torch.randn(1, 32, 12))
    assert total_macs(table) == 3 * 32 * 32 * 12 + 2 * 12 * 12 * 32


def test_quantized_attention_counts_its_out_proj_once() -> None:
    """The quantized attention calls ``out_proj`` as a module (torch's never does): the
    projection is in that row, not also in the attention's; totals equal the float model's."""
    from edgeslim.quant.api import quantize_

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = Block().eval()
    x = torch.randn(2, 5, 16)
    fp32 = layer_table(model, x)
    quantize_(model)
    q = layer_table(model, x)
    assert set(q) == {"attn", "attn.out_proj"}
    assert total_macs(q) == total_macs(fp32)
    assert q["attn.out_proj"].macs == 2 * 5 * 16 * 16
    assert sum(r.params for r in q.values()) == sum(p.numel() for p in model.parameters())


def test_inputs_packed_in_a_tuple_are_a_clear_error() -> None:
    import pytest

    from edgeslim.errors import TraceError
    from edgeslim.graph import analyze

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TraceError, match=r"one tuple of 1; pass each input as its own"):
        analyze(model, (x,))
    assert analyze(model, x).macs > 0
