"""Outside conv -> BN -> ReLU chains: every data-free method says what it did (or raises).

Models: ``prelu_cnn`` (PReLU, no BatchNorm), ``mobilenetv3_small`` (hardswish, SE, BN), the
shipped ``resnet20`` (conv-BN-ReLU) and a small all-hardswish net, all at 1x1x28x28.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgeslim.cost.analytic import cost_report
from edgeslim.datafree import (
    DataFreeSpec,
    DataFreeWarning,
    NothingToCompressError,
    analyze,
    compress_datafree,
)
from edgeslim.datafree.gaussian import act_cov, act_mean, act_var, leaky
from edgeslim.datafree.methods import cross_layer_equalize
from edgeslim.zoo.edge import mobilenetv3_small, prelu_cnn

X = torch.zeros(1, 1, 28, 28)


class HardswishNet(nn.Module):
    """conv -> BN -> hardswish twice, then a linear: nothing positively homogeneous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act1, self.act2 = nn.Hardswish(), nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(h), 1))


class Relu6Net(nn.Module):
    """conv -> BN -> ReLU6 -> conv; BN channel 0 sits at 5.5 +- 1, so it reaches the clip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.linspace(0.3, 1.0, 8))
            self.bn1.bias.copy_(torch.tensor([5.5, 0.1, 0.2, 0.0, 0.3, -0.1, 0.2, 0.1]))
            self.conv1.weight.mul_(torch.linspace(0.1, 3.0, 8).reshape(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn1(self.conv1(x))))


def _build(factory: type[nn.Module] | object) -> nn.Module:
    torch.manual_seed(0)
    assert callable(factory)
    model = factory()
    assert isinstance(model, nn.Module)
    return model.eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight")}


def test_dfq_equalizes_prelu_pairs_and_differs_from_rtn() -> None:
    model = _build(prelu_cnn)
    dfq = compress_datafree(model, "dfq", DataFreeSpec(4, 4), X)
    rtn = compress_datafree(model, "rtn", DataFreeSpec(4, 4), X)
    a, b = _weights(dfq.model), _weights(rtn.model)
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    pairs = dfq.report.pairs
    for key in ("features.0 -> features.2", "features.2 -> features.5", "fc.0 -> classifier"):
        assert pairs[key].startswith("equalized through prelu"), pairs[key]
    assert "features.2" in dfq.report.changed and not rtn.report.changed
    # no BN: bias correction is skipped, and said so, per layer
    assert "no BatchNorm statistics" in dfq.report.layers["features.5"]
    assert any(n.startswith("features.0 -> features.2: equalized") for n in dfq.notes)
    # equalization alone leaves the float function unchanged (dfq then clamps its 4-bit
    # layers, which changes it on purpose)
    chain = analyze(model, X)
    cross_layer_equalize(chain)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(chain.model(x), rtn.model(x), rtol=1e-3, atol=1e-4)


def test_dfq_with_nothing_to_equalize_raises_naming_the_reason() -> None:
    with pytest.raises(NothingToCompressError, match="dfq: nothing to equalize") as err:
        compress_datafree(_build(HardswishNet), "dfq", DataFreeSpec(4, 4), X)
    assert "conv1 -> conv2: hardswish is not positively homogeneous" in str(err.value)


def test_dfq_notes_every_pair_of_mobilenetv3() -> None:
    result = compress_datafree(_build(mobilenetv3_small), "dfq", DataFreeSpec(8, 8), X)
    pairs = result.report.pairs
    assert (
        pairs["features.4.block.0.0 -> features.4.block.1.0"]
        == ("not equalized: hardswish is not positively homogeneous")
        or "hardswish is not positively homogeneous"
        in pairs["features.4.block.0.0 -> features.4.block.1.0"]
    )
    assert pairs["features.2.block.0.0 -> features.2.block.1.0"].startswith("equalized")
    assert "read by 2 ops" in pairs["features.0.0 -> ?"]  # the residual add shares them


def test_relu6_is_equalized_only_below_its_clip() -> None:
    from edgeslim.datafree import analyze
    from edgeslim.datafree.methods import cross_layer_equalize

    model = _build(Relu6Net)
    result = compress_datafree(model, "dfq", DataFreeSpec(8, 8, edge_bits=8), X)
    text = result.report.pairs["conv1 -> conv2"]
    assert text.startswith("equalized through relu6") and "active on 1/8 channels" in text
    chain = analyze(model, X)
    cross_layer_equalize(chain)  # equalization alone: the float function is kept
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model(x), chain.model(x)
    # exact but where z passes 6 * s_k: beyond the 4 std the (uncalibrated) BN stats give
    assert float((got - ref).abs().mean()) < 1e-3 * float(ref.abs().mean())


def test_dfmpc_lowers_prelu_layers_and_says_why_per_layer() -> None:
    result = compress_datafree(_build(prelu_cnn), "dfmpc", DataFreeSpec(3, 8), X)
    bits = result.weight_bits
    assert min(bits.values()) == 3 and sorted(f for f, b in bits.items() if b == 3) == [
        "features.2", "features.8",
    ]  # fmt: skip
    layers = result.report.layers
    assert "no mean compensation" in layers["features.2"]
    assert "compensates the low-bit features.2" in layers["features.5"]
    assert "first layer" in layers["features.0"] and "last layer" in layers["classifier"]
    assert set(result.report.changed) >= {"features.2", "features.8"}


def test_dfmpc_with_no_layer_to_lower_raises_per_layer_reasons() -> None:
    with pytest.raises(NothingToCompressError, match="dfmpc: no layer can take 3 bits") as err:
        compress_datafree(_build(HardswishNet), "dfmpc", DataFreeSpec(3, 8), X)
    assert "hardswish is not positively homogeneous" in str(err.value)


@pytest.mark.parametrize("method", ["naive", "merge", "udfc"])
def test_prune_ratio_is_a_macs_fraction_on_prelu_cnn(method: str) -> None:
    model = _build(prelu_cnn)
    result = compress_datafree(model, method, DataFreeSpec(6, 6, prune_ratio=0.3), X)
    measured = 1.0 - cost_report(result.model, X).macs / cost_report(model, X).macs
    assert abs(measured - 0.3) <= 0.02, measured
    assert result.report.macs_reduction == pytest.approx(measured)
    assert sum(result.report.channels_removed.values()) > 0 and not result.report.warnings
    assert result.model(X).shape == (1, 10)


def test_prune_ratio_is_a_macs_fraction_on_resnet20() -> None:
    from edgeslim.zoo import load_zoo_model

    model = load_zoo_model("resnet20").eval()
    result = compress_datafree(model, "udfc", DataFreeSpec(6, 6, prune_ratio=0.3), X)
    measured = 1.0 - cost_report(result.model, X).macs / cost_report(model, X).macs
    assert abs(measured - 0.3) <= 0.02, measured
    assert "requested -30.0%" in result.notes[0]


def test_a_missed_macs_target_is_said_loudly() -> None:
    with pytest.warns(DataFreeWarning, match=r"removed \d+\.\d% of the MACs, requested 30.0%"):
        result = compress_datafree(
            _build(mobilenetv3_small), "naive", DataFreeSpec(6, 6, prune_ratio=0.3), X
        )
    assert result.report.macs_reduction < 0.28
    assert any(n.startswith("WARNING: naive: removed") for n in result.notes)
    assert any("not pruned" in v for v in result.report.pairs.values())


@pytest.mark.parametrize("method", ["naive", "merge", "udfc"])
def test_nothing_to_prune_raises(method: str) -> None:
    with pytest.raises(NothingToCompressError, match=f"{method}: no channel group"):
        compress_datafree(_build(HardswishNet), method, DataFreeSpec(6, 6, prune_ratio=0.3), X)


def test_leaky_moments_match_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    n = 400_000
    a = leaky((0.25, -0.1))
    mu, sd = torch.tensor([0.3, -0.5]), torch.tensor([1.0, 2.0])
    z = mu + sd * torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = a(z)
    torch.testing.assert_close(act_mean(mu, sd, a), y.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(act_var(mu, sd, a), y.var(0), atol=0.02, rtol=0.01)
    r = 0.6  # two correlated channels with different slopes
    u = z[:, 0]
    v = 0.2 + 1.5 * (
        r * (u - 0.3) + math.sqrt(1 - r * r) * torch.randn(n, generator=g, dtype=torch.float64)
    )
    yu, yv = leaky((0.25,))(u), leaky((0.05,))(v)
    got = act_cov(torch.tensor(0.3), torch.tensor(1.0), torch.tensor(0.2), torch.tensor(1.5),
                  torch.tensor(r), leaky((0.25,)), leaky((0.05,)))  # fmt: skip
    expect = ((yu - yu.mean()) * (yv - yv.mean())).mean()
    assert float(got) == pytest.approx(float(expect), abs=0.01)


class TokenMlp(nn.Module):
    """Linears over ``(batch, tokens, features)`` with ReLU between: axis 1 is the tokens,
    which the walk's per-channel statistics must not take for the linears' features."""

    def __init__(self, tokens: int = 6, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))).mean(dim=1))


@pytest.mark.parametrize("method", ["dfq", "dfmpc"])
def test_linears_over_tokens_do_not_read_the_token_axis_as_channels(method: str) -> None:
    """Was a RuntimeError (a 6-token axis multiplied by 8 input features): now the inputs
    of those linears are unknown to the walk, and each method either works without them or
    says what it could not do; it never crashes."""
    x = torch.randn(1, 6, 8)
    torch.manual_seed(0)
    model = TokenMlp().eval()
    chain = analyze(model, x)
    for stats in chain.pre.values():  # whatever is tracked has the width its layer reads
        assert stats is None or stats.mean.shape[0] in (16,)
    try:
        result = compress_datafree(model, method, DataFreeSpec(4, 8), x)
    except NothingToCompressError as err:
        assert method in str(err)
    else:
        with torch.no_grad():
            assert result.model(torch.randn(3, 6, 8)).shape == (3, 4)


def test_nothing_visible_is_said_not_left_blank() -> None:
    """torch's transformer layers are leaves to torch.fx: the walk sees one linear, no pair,
    and the refusal says why instead of ending on an empty per-layer list."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer(x).mean(dim=1))

    with pytest.raises(NothingToCompressError, match="dfq: nothing to equalize") as err:
        compress_datafree(Encoder().eval(), "dfq", DataFreeSpec(8, 8), torch.randn(1, 5, 8))
    assert "keeps whole" in str(err.value)


class SizedFlatten(nn.Module):
    """The common CNN head ``fc(x.view(x.size(0), -1))``: the size read is not a reader
    of the values, so the last conv still pairs with the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 7 * 7, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in (self.b1, self.b2):
                b.running_mean.copy_(torch.rand(8, generator=g) - 0.5)
                b.running_var.copy_(0.5 + torch.rand(8, generator=g))
                b.weight.copy_(0.2 + 2 * torch.rand(8, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.view(x.size(0), -1))


def test_a_flatten_sized_by_x_size_keeps_the_pair() -> None:
    """Before: "its activation relu is read by 2 ops (size, view): its channels are
    shared", so ``c2`` had no pair."""
    torch.manual_seed(0)
    model = SizedFlatten().eval()
    dfq = compress_datafree(model, "dfq", DataFreeSpec(8, 8), X)
    assert dfq.report.pairs["c2 -> fc"].startswith("equalized through relu")
    chain = analyze(model, X)
    cross_layer_equalize(chain)  # equalization alone keeps the float function
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(chain.model(x), model(x), rtol=1e-3, atol=1e-4)
