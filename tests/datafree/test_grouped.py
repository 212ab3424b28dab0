"""Data-free methods on grouped convs (ResNeXt, RegNet, ShuffleNet-v1 style, ``1 < groups
< channels``): each row of such a conv reads only its own group's input channels, so the
statistics the methods carry through it, and the input variance each weight multiplies,
must be taken per group. Every method crashed on such a model before (a weight of
``(O, C / groups)`` columns met a ``C``-channel variance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model
from edgeslim.datafree.chain import Stats, group_inputs, layer_output
from edgeslim.datafree.compensate import inner_products, input_variance


class _ResNeXtBlock(nn.Module):
    """A stem, a bottleneck whose 3x3 conv has 8 groups, a residual add and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())  # fmt: skip
        self.reduce = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=8, bias=False),
                                     nn.BatchNorm2d(64), nn.ReLU())  # fmt: skip
        self.expand = nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.expand(self.grouped(self.reduce(x))))
        return self.head(x.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _ResNeXtBlock()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):  # trained-looking statistics
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.3, 2.0)
            nn.init.uniform_(bn.weight, 0.4, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.4)
    return m.eval()


def test_group_inputs_names_each_rows_channels() -> None:
    conv = nn.Conv2d(12, 6, 3, groups=3)  # 4 input channels per group, 2 rows per group
    idx = group_inputs(conv)
    assert idx is not None
    assert idx.tolist() == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2 + [[8, 9, 10, 11]] * 2
    assert group_inputs(nn.Conv2d(12, 6, 3)) is None


def test_statistics_through_a_grouped_conv_match_sampled_ones() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 1, groups=2, bias=True).double()
    mean = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    var = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    out = layer_output(conv, Stats(mean, var))
    assert out is not None
    x = mean[None, :, None, None] + var.sqrt()[None, :, None, None] * torch.randn(
        200_000, 8, 1, 1, dtype=torch.float64
    )
    with torch.no_grad():
        y = conv(x).flatten(1)
    torch.testing.assert_close(out.mean, y.mean(0), atol=0.02, rtol=0.0)
    torch.testing.assert_close(out.var, y.var(0), atol=0.0, rtol=0.02)


def test_input_variance_and_inner_products_follow_the_groups() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    var = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    x = Stats(torch.zeros(4, dtype=torch.float64), var)
    v = input_variance(conv, x)
    assert v.shape == conv.weight.shape
    assert v[:, :, 0, 0].tolist() == [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]
    with torch.no_grad():
        conv.weight.fill_(1.0)
    gram = inner_products(conv, conv.weight, conv.weight, x)
    # rows 0-1 read channels 0-1 (variance 1 + 2), rows 2-3 channels 2-3 (3 + 4); rows of
    # different groups share no input, so their inner product is 0
    expected = torch.tensor([[3.0, 3, 0, 0], [3, 3, 0, 0], [0, 0, 7, 7], [0, 0, 7, 7]])
    torch.testing.assert_close(gram, expected.to(torch.float64))


@pytest.mark.parametrize(("method", "low", "high"), [("dfq", 4, 8), ("dfmpc", 4, 8)])
def test_methods_run_on_a_grouped_conv_and_keep_the_outputs(
    method: str, low: int, high: int
) -> None:
    model = _model()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    result = compress_datafree(model, method, DataFreeSpec(low, high), x[:1])
    assert low in set(result.weight_bits.values())
    with torch.no_grad():
        out = quantized_model(result).eval()(x)
    cos = torch.nn.functional.cosine_similarity(out, ref).mean()
    assert cos > 0.99, cos
    if method == "dfmpc":  # the grouped conv consumes `reduce`: not a pair, and it says why
        assert "grouped conv" in result.report.layers["reduce.0"]


def test_a_grouped_network_exports_on_integer_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The recipe stage's form (statistics ranges, edges quantized): every conv of the
    ResNeXt-style block runs on ONNX Runtime's integer kernels."""
    from edgeslim.export.qdq import export_qdq
    from edgeslim.runtime.kernels import kernel_coverage

    x = torch.randn(1, 3, 16, 16)
    result = compress_datafree(_model(), "dfq", DataFreeSpec(8, 8), x)
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    path = export_qdq(edged, (x,), tmp_path / "dfq.onnx")
    share = kernel_coverage(path, (x,)).int8_mac_share
    assert share > 0.95, share
