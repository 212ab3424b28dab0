"""Fan-out pairs: one activation read by several convs (a Fire or Inception block)."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.datafree import DataFreeSpec, analyze, compress_datafree
from edgeslim.datafree.methods import cross_layer_equalize
from edgeslim.datafree.ops import quantize_weight


class Fire(nn.Module):
    """stem -> BN -> act -> {a (1x1), b (3x3)} -> cat -> head; ``tail``: the activation is
    also read by an add (not a conv)."""

    def __init__(self, act: nn.Module | None = None, tail: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = act or nn.ReLU()
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)
        self.tail = tail
        with torch.no_grad():
            for m in (self.stem, self.a, self.b, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            # channel scales 100x apart: what per-tensor rounding of the folded stem loses
            self.bn.weight.copy_(torch.logspace(-1, 1, 8))
            self.bn.bias.copy_(0.5 * torch.logspace(-1, 1, 8))
            self.bn.running_var.fill_(1.0)
            self.bn.running_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.stem(x)))
        out = self.head(torch.cat([self.a(h), self.b(h)], 1))
        return out + h[:, :4] if self.tail else out


class Inception(nn.Module):
    """stem -> BN -> ReLU -> {a (1x1), b (3x3), max pool -> c (1x1)} -> cat -> head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.pool, self.c = nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            self.bn.weight.copy_(torch.logspace(-1, 1, 8))
            for m in (self.a, self.b, self.c):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.cat([self.a(h), self.b(h), self.c(self.pool(h))], 1))


def _bn_from_inputs(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics that describe ``x`` (so the data-free model is honest)."""
    model.train()
    bn = model.get_submodule("bn")
    assert isinstance(bn, nn.BatchNorm2d)
    bn.momentum = None
    bn.reset_running_stats()
    with torch.no_grad():
        model(x)
    return model.eval()


X = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_an_activation_read_by_two_convs_is_a_fan_out_pair() -> None:
    chain = analyze(Fire(), X[:1])
    pair = chain.fanned["stem"]
    assert pair.consumers == ("a", "b") and pair.act_name == "relu"
    assert "stem" not in chain.pairs  # one-consumer methods keep refusing it, named
    assert "read by 2 layers (a, b)" in chain.why_not("stem")
    assert chain.pair_into("b") is pair and chain.pair_into("a") is pair


def test_equalization_keeps_the_function_and_meets_the_largest_consumer() -> None:
    model = Fire().eval()
    chain = analyze(model, X[:1])
    before = chain.model(X)
    notes = cross_layer_equalize(chain)
    assert notes["stem -> a, b"].startswith("equalized through relu")
    torch.testing.assert_close(chain.model(X), before, rtol=1e-4, atol=1e-4)
    r1 = chain.layer("stem").weight.abs().amax((1, 2, 3))
    r2 = torch.stack([chain.layer(c).weight.abs().amax((0, 2, 3)) for c in "ab"]).amax(0)
    torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0.0)


def test_dfq_repairs_per_tensor_rounding_of_a_fan_out_producer() -> None:
    model = _bn_from_inputs(Fire(), X)
    ref = model(X).detach()
    spec = DataFreeSpec(low_bits=4, high_bits=4, edge_bits=4, granularity="tensor")
    err = {}
    for method in ("rtn", "dfq"):
        result = compress_datafree(model, method, spec, X[:1])
        q = result.model
        with torch.no_grad():
            for fqn, bits in result.weight_bits.items():
                w = q.get_submodule(fqn).weight
                w.copy_(quantize_weight(w, bits, "tensor"))
            err[method] = float((q(X) - ref).pow(2).mean() / ref.pow(2).mean())
    assert err["dfq"] < 0.6 * err["rtn"], err  # 0.031 against 0.059


def test_a_branch_through_its_own_pool_is_a_consumer_too() -> None:
    model = Inception().eval()
    chain = analyze(model, X[:1])
    pair = chain.fanned["stem"]
    assert pair.consumers == ("a", "b", "c") and pair.max_pool
    before = chain.model(X)
    assert cross_layer_equalize(chain)["stem -> a, b, c"].startswith("equalized")
    torch.testing.assert_close(chain.model(X), before, rtol=1e-4, atol=1e-4)


def test_a_fan_out_to_anything_but_convs_stays_blocked() -> None:
    chain = analyze(Fire(tail=True), X[:1])
    assert "stem" not in chain.fanned and "stem" not in chain.pairs
    assert "its channels are shared" in chain.why_not("stem")
    chain = analyze(Fire(act=nn.Hardswish()), X[:1])
    assert "stem" not in chain.fanned
    assert "not positively homogeneous" in chain.why_not("stem")
