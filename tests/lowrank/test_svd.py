"""Post-hoc SVD factorization, checked by what it promises.

At full rank the two layers are the original layer (any shape, stride, padding, dilation,
bias); at rank r they are the best rank-r approximation (the discarded energy is exactly
the tail of the spectrum); a MACs target is met on the layer table of the result, or
refused with the model untouched; the result fx-traces and its ONNX export matches torch
on real images at two batch sizes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs, trace
from edgeslim.lowrank import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankError,
    LowRankLinear,
    SVDConfig,
    factorize_,
    factorize_layer,
)
from edgeslim.lowrank.modules import FQN_ATTR, weight_matrix
from edgeslim.runtime.ort import ort_session
from edgeslim.zoo import resolve_model


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return resolve_model("resnet20").eval()


@pytest.fixture(scope="module")
def images(fmnist_test_small):  # type: ignore[no-untyped-def]
    return fmnist_test_small.images[:64]


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    bias=st.booleans(),
    rows=st.integers(1, 5),
)
def test_linear_full_rank_is_exact(n_in: int, n_out: int, bias: bool, rows: int) -> None:
    torch.manual_seed(n_in * 31 + n_out)
    layer = nn.Linear(n_in, n_out, bias=bias)
    low = factorize_layer(layer, min(n_in, n_out))
    assert isinstance(low, LowRankLinear) and low.reduce.out_features == min(n_in, n_out)
    x = torch.randn(rows, n_in)
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 8),
    c_out=st.integers(1, 12),
    k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
)
def test_conv_full_rank_is_exact(
    c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int, bias: bool
) -> None:
    torch.manual_seed(c_in * 13 + c_out * 7 + k)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, bias=bias)
    rank = min(c_out, c_in * k * k)
    low = factorize_layer(conv, rank)
    assert isinstance(low, LowRankConv2d)
    assert low.reduce.kernel_size == (k, k) and low.expand.kernel_size == (1, 1)
    x = torch.randn(2, c_in, 11, 11)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 8),
    c_out=st.integers(1, 12),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 3),
    mode=st.sampled_from(["zeros", "reflect"]),
)
def test_conv1d_full_rank_is_exact(
    c_in: int, c_out: int, k: int, stride: int, dilation: int, mode: str
) -> None:
    """1-D convs (audio, sensor, text CNNs) factorize as a length-k conv then a length-1."""
    torch.manual_seed(c_in * 13 + c_out * 7 + k)
    conv = nn.Conv1d(c_in, c_out, k, stride, k // 2, dilation, padding_mode=mode)
    low = factorize_layer(conv, min(c_out, c_in * k))
    assert isinstance(low, LowRankConv1d)
    assert low.reduce.kernel_size == (k,) and low.expand.kernel_size == (1,)
    x = torch.randn(2, c_in, 23)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-4)


def test_a_conv1d_network_meets_a_macs_target_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(6, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 64, 3, padding=2, dilation=2),
        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 5),
    ).eval()  # fmt: skip
    x = torch.randn(4, 6, 50)
    before = total_macs(layer_table(model, x[:1]))
    report = factorize_(model, (x[:1],), SVDConfig(macs_reduction=0.3))
    assert isinstance(model[2], LowRankConv1d)
    assert total_macs(layer_table(model, x[:1])) <= 0.7 * before + 1
    assert report.layers
    path = export_onnx(model, (x[:1],), tmp_path / "c1d.onnx")
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


def test_a_conv3d_video_network_factorizes_exactly_at_full_rank_and_exports(
    tmp_path: Path,
) -> None:
    """3-D convs (video) were refused ("not a plain nn.Linear, nn.Conv1d or nn.Conv2d"):
    a k x k x k conv to ``rank`` channels, then a 1x1x1 conv."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1)
    low = factorize_layer(conv, 8)
    assert isinstance(low, LowRankConv3d) and low.expand.kernel_size == (1, 1, 1)
    x = torch.randn(2, 3, 4, 10, 10)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-4)
    model = nn.Sequential(
        nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()  # fmt: skip
    before = total_macs(layer_table(model, x[:1]))
    factorize_(model, (x[:1],), SVDConfig(macs_reduction=0.3))
    assert any(isinstance(m, LowRankConv3d) for m in model.modules())
    assert total_macs(layer_table(model, x[:1])) <= 0.7 * before + 1
    path = export_onnx(model, (x[:1],), tmp_path / "c3d.onnx")
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncation_is_the_best_rank_r_approximation(rank: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, padding=1)
    low = factorize_layer(conv, rank)
    assert isinstance(low, LowRankConv2d)
    product = low.expand.weight.reshape(16, rank) @ low.reduce.weight.reshape(rank, -1)
    s = torch.linalg.svdvals(weight_matrix(conv))
    err = (weight_matrix(conv) - product.double()).square().sum()
    torch.testing.assert_close(err, s[rank:].square().sum(), rtol=1e-4, atol=1e-8)  # Eckart-Young
    assert torch.linalg.matrix_rank(product).item() == rank


def test_grouped_convs_are_left_dense_with_the_reason() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip
    with pytest.raises(LowRankError, match="grouped"):
        factorize_layer(model[1], 2)  # type: ignore[arg-type]
    report = factorize_(model, (torch.randn(1, 4, 6, 6),), SVDConfig(energy=0.5))
    assert "groups=8" in report.skipped["1"] and type(model[1]) is nn.Conv2d
    assert isinstance(model[3], LowRankLinear)
    assert [r.fqn for r in report.layers] == [n for n in ("0", "3") if n not in report.skipped]


def test_an_attention_out_proj_is_left_dense_naming_why() -> None:
    """nn.MultiheadAttention reads out_proj.weight itself: the report called it 'not a plain
    nn.Linear', which says nothing a user can act on."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = nn.Linear(16, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ff(self.attn(x, x, x, need_weights=False)[0])

    model = Block().eval()
    report = factorize_(model, (torch.randn(1, 5, 16),), SVDConfig(energy=0.5))
    assert "reads its weight directly" in report.skipped["attn.out_proj"]
    assert isinstance(model.ff, LowRankLinear)


@pytest.mark.parametrize("reduction", [0.3, 0.5])
def test_macs_target_is_met_on_the_layer_table(
    resnet20: nn.Module, images: torch.Tensor, reduction: float
) -> None:
    model = copy.deepcopy(resnet20)
    ex = (images[:1],)
    before = total_macs(layer_table(model, *ex))
    report = factorize_(model, ex, SVDConfig(macs_reduction=reduction))
    measured = total_macs(layer_table(model, *ex))
    assert report.macs_before == before and report.macs_after == measured
    assert measured <= (1 - reduction) * before
    assert report.macs_reduction >= reduction
    assert report.macs_reduction < reduction + 0.05  # met, not overshot by a blunt rule
    for row in report.layers:
        low = model.get_submodule(row.fqn)
        assert isinstance(low, LowRankConv2d | LowRankLinear)
        assert low.reduce.weight.shape[0] == row.kept_rank < row.max_rank
        assert 0 < row.macs_after < row.macs_before
    assert sum(r.macs_before - r.macs_after for r in report.layers) == before - measured


def test_more_macs_removed_means_a_larger_output_error(
    resnet20: nn.Module, images: torch.Tensor
) -> None:
    with torch.no_grad():
        ref = resnet20(images)
    errors = []
    for reduction in (0.2, 0.4, 0.6):
        model = copy.deepcopy(resnet20)
        factorize_(model, (images[:1],), SVDConfig(macs_reduction=reduction))
        with torch.no_grad():
            errors.append(float((model(images) - ref).square().mean() / ref.square().mean()))
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < 0.1  # -20% MACs keeps the logits close


def test_energy_rule_and_rounding(resnet20: nn.Module, images: torch.Tensor) -> None:
    model = copy.deepcopy(resnet20)
    report = factorize_(model, (images[:1],), SVDConfig(energy=0.8, round_to=8, skip=("conv1",)))
    assert report.skipped["conv1"] == "skipped by request" and type(model.conv1) is nn.Conv2d
    assert report.layers
    for row in report.layers:
        assert row.kept_rank % 8 == 0 or row.kept_rank == row.max_rank
        assert row.energy >= 0.8
    for fqn, why in report.skipped.items():
        assert fqn == "conv1" or "saves no MACs" in why
    with pytest.warns(UserWarning, match="matches no layer"):
        factorize_(copy.deepcopy(resnet20), (images[:1],), SVDConfig(skip=("layer9.*",)))


def test_unreachable_target_is_refused_and_the_model_untouched(
    resnet20: nn.Module, images: torch.Tensor
) -> None:
    model = copy.deepcopy(resnet20)
    with pytest.raises(LowRankError, match=r"cannot be reached .* keeps [\d,]+ of"):
        factorize_(model, (images[:1],), SVDConfig(macs_reduction=0.97))
    # the layers left whole are named in the error (no report is written when it is refused)
    with pytest.raises(LowRankError, match=r"Left whole: conv1: skipped by request"):
        factorize_(model, (images[:1],), SVDConfig(macs_reduction=0.97, skip=("conv1",)))
    assert not any(isinstance(m, LowRankConv2d | LowRankLinear) for m in model.modules())
    for a, b in zip(model.state_dict().values(), resnet20.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(LowRankError, match="macs_reduction"):
        SVDConfig(macs_reduction=1.2)


def test_factorized_model_traces_and_exports_to_onnx(
    resnet20: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    model = copy.deepcopy(resnet20)
    factorize_(model, (images[:1],), SVDConfig(macs_reduction=0.5, round_to=8))
    model.eval()
    traced = trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(images[:8]), model(images[:8]))
    path = export_onnx(model, (images[:1],), tmp_path / "lowrank.onnx")
    session = ort_session(path)
    for batch in (images[:1], images[1:24]):  # two inputs, two batch sizes
        got = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
        with torch.no_grad():
            want = model(batch)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (batch first), as a ViT or text classifier holds it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x)[:, 0])


def test_factorized_encoder_layers_run_in_eval_without_grad() -> None:
    """An encoder layer's fused inference kernel reads ``linear1.weight``, which a factorized
    layer has not: it must take its layer-by-layer path (it raised AttributeError)."""
    model = Encoder().eval()
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(0))
    report = factorize_(model, (x[:1],), SVDConfig(macs_reduction=0.2))
    assert any(row.fqn.endswith("linear1") for row in report.layers)
    with torch.no_grad():
        fast = model(x)  # eval + no_grad: where the fused kernel would run
    torch.testing.assert_close(fast, model(x).detach())  # grad on: layer by layer


class ReadsItsWeight(nn.Module):
    """Hugging Face's ViT family: the input is cast to the patch conv's ``weight.dtype``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)
        return self.head(self.proj(x).mean((2, 3)))


def test_a_layer_whose_weight_is_read_around_it_is_kept_whole_and_named() -> None:
    """Before, the run stopped with an error asking for ``skip: [proj]``; the layer is now
    kept whole by itself, the report says why, and the others are factorized."""
    x = (torch.randn(1, 3, 8, 8),)
    model = ReadsItsWeight()
    report = factorize_(model, x, SVDConfig(energy=0.5))
    assert type(model.proj) is nn.Conv2d and model(*x).shape == (1, 5)
    assert "reads its `weight`" in report.skipped["proj"]
    assert [r.fqn for r in report.layers] == ["head"]
    with pytest.raises(LowRankError, match=r"no layer.*proj: kept whole"):
        factorize_(ReadsItsWeight(), x, SVDConfig(energy=0.5, skip=("head",)))
    pair = factorize_layer(ReadsItsWeight().proj, 2)  # read by code outside factorize_
    object.__setattr__(pair, FQN_ATTR, "proj")
    with pytest.raises(LowRankError, match=r"reads its `weight`.*`skip: \[proj\]`"):
        pair.weight  # noqa: B018
