"""input_rows: a layer's input laid out against its weight matrix reproduces its output."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.graph.patches import input_rows, num_rows, output_rows, rows_supported


def _check(layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> None:
    """Rows times the weight give the output; picked rows are those rows, gathered."""
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    every = input_rows(layer, x)
    rows = every @ w.T
    if layer.bias is not None:
        rows = rows + layer.bias
    torch.testing.assert_close(rows, output_rows(layer, layer(x)), rtol=1e-4, atol=1e-4)
    assert num_rows(layer, x) == every.shape[0]
    pick = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(1))[:7]
    assert torch.equal(input_rows(layer, x, pick), every[pick])


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    dims=st.sampled_from([1, 2, 3]),
    bias=st.booleans(),
)
def test_conv_rows_times_the_weight_give_the_conv_output(
    kernel: int, stride: int, dilation: int, padding: int | str, mode: str, dims: int,
    bias: bool,
) -> None:  # fmt: skip
    if padding == "same":
        stride = 1  # torch refuses "same" with stride
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    layer = conv(3, 5, kernel, stride, padding, dilation, bias=bias, padding_mode=mode)
    x = torch.randn(2, 3, *(11, 9, 8)[3 - dims :])
    _check(layer, x)


def test_3d_rows_follow_each_axis_of_an_uneven_kernel() -> None:
    """A (3, 1, 2) kernel with a different stride and dilation per axis: a mix-up of the
    axes would still give square-kernel outputs right."""
    torch.manual_seed(0)
    layer = nn.Conv3d(2, 4, (3, 1, 2), stride=(1, 2, 1), dilation=(2, 1, 1), padding=(1, 0, 1))
    _check(layer, torch.randn(2, 2, 7, 6, 5))


def test_linear_rows_keep_every_leading_dimension() -> None:
    torch.manual_seed(0)
    _check(nn.Linear(6, 4), torch.randn(2, 3, 6))


def test_grouped_and_transposed_convs_are_refused() -> None:
    assert rows_supported(nn.Conv2d(4, 4, 3, groups=4)) == "grouped conv (groups=4)"
    assert rows_supported(nn.ConvTranspose2d(4, 4, 3)) == "a transposed conv"
    assert rows_supported(nn.ConvTranspose3d(4, 4, 3)) == "a transposed conv"
    with pytest.raises(ValueError, match="grouped conv"):
        input_rows(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
