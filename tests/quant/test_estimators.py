"""Estimators: every quantizer x every estimator, each estimator's gradient rule, the
schedules, and a tiny QAT run on sklearn digits."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from edgeslim.data import load_digits_split
from edgeslim.quant.base import Estimator
from edgeslim.quant.estimators import AQE, EstimatorBase, NBQBlend, TanhSoftRound, estimate
from edgeslim.quant.quantizers import RangeQuantizer, UniformQuantizer
from edgeslim.quant.registries import ESTIMATORS, QUANTIZERS
from edgeslim.quant.spec import QuantSpec

QUANTS: list[tuple[str, int, bool]] = [
    ("uniform", 4, True),
    ("uniform", 3, False),
    ("pow2", 3, True),
    ("binary", 1, True),
    ("ternary", 2, True),
    ("codebook", 2, True),
]
QIDS = [f"{n}{b}{'' if s else 'a'}" for n, b, s in QUANTS]
ALL_ESTIMATORS = ("ste", "clipped_ste", "lsq", "pact", "aqe", "tanh", "nbq")
ZERO_OUTSIDE = ("clipped_ste", "lsq", "pact", "tanh")  # flat beyond the extreme levels


def make(name: str, bits: int, sym: bool = True, is_weight: bool = True) -> RangeQuantizer:
    spec = QuantSpec(quantizer=name, bits=bits, granularity="channel", symmetric=sym)
    q = QUANTIZERS.get(name)(spec, is_weight=is_weight)
    assert isinstance(q, RangeQuantizer)
    return q


def weight() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 3, 3, generator=gen) * torch.linspace(0.2, 1.5, 8)[:, None, None, None]


@pytest.fixture(scope="module")
def activations() -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU features of real digits through a fixed random layer: (calibration, test)."""
    x = load_digits_split("test").images.reshape(-1, 64)
    w = torch.randn(64, 24, generator=torch.Generator().manual_seed(1)) / 4
    a = torch.relu(x @ w)
    return a[:200], a[200:264]


def calibrated(
    name: str, bits: int, sym: bool, kind: str, acts: tuple[torch.Tensor, torch.Tensor]
) -> tuple[RangeQuantizer, torch.Tensor]:
    """A calibrated quantizer and the tensor to feed it (activations: an unseen batch)."""
    if kind == "weight":
        q, x = make(name, bits, sym), weight()
        q.init_range(x)
    else:
        q, x = make(name, bits, sym, is_weight=False), acts[1]
        q.init_range(acts[0])
    return q, x


def spacing(q: RangeQuantizer) -> torch.Tensor:
    """Smallest positive gap between levels of each group, ``(G, 1)``."""
    lv = q.levels().detach()
    gaps = lv[:, 1:] - lv[:, :-1]
    return gaps.masked_fill(gaps <= 0, math.inf).amin(1, keepdim=True)


def run(est: Estimator, q: RangeQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward with a random upstream gradient; returns (output, input grad)."""
    xr = x.detach().clone().requires_grad_()
    y = est(q, xr)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * up).sum().backward()
    assert xr.grad is not None
    return y, xr.grad


def test_every_estimator_is_registered_and_follows_the_protocol() -> None:
    assert set(ALL_ESTIMATORS) <= set(ESTIMATORS.names())
    for name in ALL_ESTIMATORS:
        est = ESTIMATORS.get(name)()
        assert isinstance(est, Estimator) and isinstance(est, EstimatorBase)
        est.set_progress(7.0)
        assert est.progress == 1.0
        est.set_progress(-1.0)
        assert est.progress == 0.0


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("est_name", ALL_ESTIMATORS)
@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_matrix_forward_backward(
    qname: str,
    bits: int,
    sym: bool,
    est_name: str,
    kind: str,
    activations: tuple[torch.Tensor, torch.Tensor],
) -> None:
    q, x = calibrated(qname, bits, sym, kind, activations)
    est = ESTIMATORS.get(est_name)()
    est.prepare(q)
    y, grad = run(est, q, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if est_name in ZERO_OUTSIDE:  # the legitimate zeros: exactly beyond the level range
        lv = q.levels().detach()
        g = q.to_groups(x)
        outside = q.from_groups((g < lv[:, :1]) | (g > lv[:, -1:]), x)
        assert (grad[outside] == 0).all()
        assert (grad[~outside] != 0).any()
    if est_name in ("lsq", "pact"):
        assert isinstance(q.range_param, nn.Parameter)
        assert q.range_param.grad is not None and torch.isfinite(q.range_param.grad).all()
    est.set_progress(1.0)
    y1, grad1 = run(est, q, x)
    assert torch.equal(y1.detach(), q.quantize(x)), "progress 1 must give the hard quantizer"
    assert torch.isfinite(grad1).all()


@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_ste_and_nbq_pass_the_gradient_unchanged(qname: str, bits: int, sym: bool) -> None:
    q, x = make(qname, bits, sym), weight()
    q.init_range(0.5 * x)  # much of x is clipped: STE still passes everything
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for est in (ESTIMATORS.get("ste")(), NBQBlend()):
        _, grad = run(est, q, x)
        assert torch.equal(grad, up)
    nbq = NBQBlend()
    nbq.set_progress(0.3)
    y, _ = run(nbq, q, x)
    assert torch.allclose(y, 0.7 * x + 0.3 * q.quantize(x), atol=1e-6)


@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_lsq_gives_a_range_gradient(qname: str, bits: int, sym: bool) -> None:
    q, x = make(qname, bits, sym), weight()
    q.init_range(x)
    est = ESTIMATORS.get("lsq")()  # no prepare: the first call makes the range learnable
    run(est, q, x)
    g = q.range_param.grad
    assert isinstance(q.range_param, nn.Parameter) and g is not None
    assert torch.isfinite(g).all() and (g != 0).any()


def test_lsq_matches_the_reference_formula_for_uniform() -> None:
    """Against a literal LSQ: ``s' * clamp(round_ste(x / s'), qmin, qmax)``, s' the scale
    with gradient scaled by 1/sqrt(M * qmax)."""
    x = weight() * 1.3
    q = make("uniform", 4, True)
    q.init_range(weight())  # some of x is clipped
    est = ESTIMATORS.get("lsq")()
    est.prepare(q)
    y, grad = run(est, q, x)
    s = q.range_param.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    gs = 1 / math.sqrt(x[0].numel() * 7)
    s_ = (s * gs + (s - s * gs).detach())[:, None, None, None]
    v = (xr / s_).clamp(-7, 7)
    ref = (v + (v.round() - v).detach()) * s_
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (ref * up).sum().backward()
    assert torch.allclose(y, ref, atol=1e-6)
    assert xr.grad is not None and s.grad is not None and q.range_param.grad is not None
    assert torch.allclose(grad, xr.grad)
    assert torch.allclose(q.range_param.grad, s.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_pact_clip_gradient_comes_from_clipped_elements(qname: str, bits: int, sym: bool) -> None:
    q, x = make(qname, bits, sym), weight()
    q.init_range(x)
    pact = ESTIMATORS.get("pact")()
    pact.prepare(q)
    run(pact, q, q.quantize(x))  # every element is a level: nothing clipped, no clip gradient
    assert q.range_param.grad is not None and (q.range_param.grad == 0).all()
    q.range_param.grad = None
    run(pact, q, 3 * x)
    assert q.range_param.grad is not None and (q.range_param.grad != 0).any()


def test_pact_on_unsigned_activations_is_the_paper_rule(
    activations: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """ReLU input, asymmetric 4-bit (zero point 0): dy/dα = 1 for x > α, so d/ds = qmax·Σ."""
    calib, x = activations
    q = make("uniform", 4, False, is_weight=False)
    assert isinstance(q, UniformQuantizer)
    q.init_range(calib * 0.5)
    pact = ESTIMATORS.get("pact")()
    pact.prepare(q)
    _, grad = run(pact, q, x)
    alpha = q.levels()[0, -1].item()
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(q.zero_point, torch.zeros(1)) and (x > alpha).any()
    assert q.range_param.grad is not None
    assert torch.allclose(q.range_param.grad, 15 * up[x > alpha].sum(), rtol=1e-4)
    assert torch.equal(grad, up * (x <= alpha))


@pytest.mark.parametrize("est_cls", [AQE, TanhSoftRound])
@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_smooth_estimators_sharpen_monotonically(
    est_cls: type[AQE] | type[TanhSoftRound], qname: str, bits: int, sym: bool
) -> None:
    q, x = make(qname, bits, sym), weight()
    q.init_range(x)
    lv = q.levels().detach()
    inside = q.from_groups((q.to_groups(x) > lv[:, :1]) & (q.to_groups(x) < lv[:, -1:]), x)
    est = est_cls()
    est.set_progress(0.0)
    _, grad0 = run(est, q, x)
    assert (grad0[inside] != 0).all(), "smooth at progress 0: gradient nonzero everywhere"
    gaps, per_elem = [], []
    for p in (0.0, 0.5, 1.0):
        est.set_progress(p)
        gap = q.to_groups(est(q, x) - q.quantize(x)).abs().detach() / spacing(q)
        gaps.append(gap.mean().item())
        per_elem.append(gap)
    assert gaps[0] > 2 * gaps[1] > 2 * gaps[2] == 0.0, gaps
    if est_cls is TanhSoftRound:  # monotone in k for every single element
        assert (per_elem[1] <= per_elem[0] + 1e-6).all()
    # the end of the schedule (k_max) itself: off by > 1e-3 gap only near thresholds
    g = q.to_groups(x)
    f = q.to_groups(est.surrogate(q, x, est.k_max))
    t, d = (lv[:, 1:] + lv[:, :-1]) / 2, lv[:, 1:] - lv[:, :-1]
    near = ((g[..., None] - t[:, None, :]).abs() < 0.04 * d[:, None, :]).any(-1)
    err = (f - q.to_groups(q.quantize(x))).abs() / d.amax(1, keepdim=True)
    assert (err[~near] < 1e-3).all() and near.float().mean() < 0.15


def test_aqe_binary_is_scaled_tanh_and_window_matches_full_sum() -> None:
    x = weight()
    b = make("binary", 1)
    b.init_range(x)
    a = b.levels()[:, 1:].reshape(-1, 1, 1, 1)
    for k in (1.0, 7.0):
        f = AQE().surrogate(b, x, k)
        assert torch.allclose(f, a * torch.tanh(k * x / (2 * a)), atol=1e-6)
    u = make("uniform", 8, False)
    u.init_range(x)
    d = spacing(u).max().item()
    for k in (1.0, 10.0):
        local = AQE(window=16).surrogate(u, x, k)
        full = AQE(window=10**6).surrogate(u, x, k)
        assert (local - full).abs().max().item() < 1e-3 * d


def test_tanh_soft_round_passes_through_levels_and_is_identity_when_soft() -> None:
    q = make("uniform", 3, True)
    x = weight()
    q.init_range(x)
    at_levels = q.levels().repeat(1, 6)[:, :36].reshape(x.shape)  # 7 levels per channel
    for k in (0.5, 5.0, 50.0):
        r = TanhSoftRound().surrogate(q, at_levels, k)
        assert torch.allclose(r, at_levels, atol=1e-6)
    soft = TanhSoftRound().surrogate(q, x, 1e-3)
    assert torch.allclose(soft, x, atol=1e-5)  # max-calibrated: nothing clipped


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops run ~8x faster single-threaded while the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _QLinear(nn.Linear):
    """Minimal fake-quant linear: weight through an estimator, range re-set each step."""

    def __init__(self, n_in: int, n_out: int, spec: QuantSpec, est: Estimator) -> None:
        super().__init__(n_in, n_out)
        self.quantizer = QUANTIZERS.get(spec.quantizer)(spec)
        self.est = est

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.quantizer.init_range(self.weight.detach())
        return nn.functional.linear(x, self.est(self.quantizer, self.weight), self.bias)

    def hard(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantizer.quantize(self.weight), self.bias)


@pytest.mark.usefixtures("one_thread")
def test_qat_two_bit_weights_with_aqe_learns_digits() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    x, y = train.images.reshape(len(train), -1), train.labels
    torch.manual_seed(0)
    spec = QuantSpec(bits=2, granularity="channel", estimator="aqe")
    est = ESTIMATORS.get("aqe")()
    l1, l2 = _QLinear(64, 16, spec, est), _QLinear(16, 10, spec, est)
    opt = torch.optim.Adam([*l1.parameters(), *l2.parameters()], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    epochs, bs = 4, 16
    steps, step = epochs * math.ceil(len(y) / bs), 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), bs):
            est.set_progress(step / (steps - 1))
            step += 1
            idx = perm[i : i + bs]
            loss = nn.functional.cross_entropy(l2(torch.relu(l1(x[idx]))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = l2.hard(torch.relu(l1.hard(test.images.reshape(len(test), -1))))
        acc = (logits.argmax(1) == test.labels).float().mean().item()
    for layer in (l1, l2):  # 2-bit symmetric: at most 3 values per output channel
        assert all(len(row.unique()) <= 3 for row in layer.quantizer.quantize(layer.weight))
    assert acc > 0.8, acc


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("est_name", ALL_ESTIMATORS)
@pytest.mark.parametrize(("qname", "bits", "sym"), QUANTS, ids=QIDS)
def test_estimate_without_autograd_is_the_estimators_value(
    qname: str,
    bits: int,
    sym: bool,
    est_name: str,
    progress: float,
    activations: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """``estimate`` skips the gradient carriers only where the forward is the hard
    quantizer: its value equals the estimator's own call, smooth estimators included."""
    q, x = calibrated(qname, bits, sym, "activation", activations)
    est = ESTIMATORS.get(est_name)()
    est.set_progress(progress)
    full = est(q, x).detach()
    with torch.no_grad():
        fast = estimate(est, q, x)
    assert torch.equal(fast, full)
    smooth = est_name in ("aqe", "tanh", "nbq") and progress < 1.0
    assert est.forward_is_hard() is not smooth
    if smooth:  # the surrogate, not the hard quantizer
        assert not torch.equal(fast, q.quantize(x))


def test_estimate_with_autograd_keeps_the_gradient() -> None:
    q = make("uniform", 4, True)
    x = weight().requires_grad_()
    q.init_range(x.detach())
    y = estimate(ESTIMATORS.get("ste")(), q, x)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_estimate_calls_an_estimator_not_derived_from_the_base() -> None:
    q = make("uniform", 4, True)
    x = weight()
    q.init_range(x)
    calls: list[int] = []

    def halve(quantizer: object, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return t / 2

    with torch.no_grad():
        assert torch.equal(estimate(halve, q, x), x / 2)
    assert calls == [1]


def test_a_learned_step_stays_positive_through_training() -> None:
    """LSQ's step is an optimizer's parameter like any other; a loss that wants the
    activation gone drives it through zero in one large step (a fine-tune did so to a
    step after a global average pool: torch then zeroed that activation for good and ONNX
    Runtime refused the file's negative scale). The training loop now holds it at a
    thousandth of its value when training started."""
    from edgeslim.quant.quantizers import LEARNED_RANGE_FLOOR
    from edgeslim.train.loop import TrainConfig, train_classifier

    class Clip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.est = make("uniform", 8, False, is_weight=False), ESTIMATORS.get("lsq")()
            self.q.set_range(torch.tensor([0.0]), torch.tensor([1.0]))
            self.est.prepare(self.q)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.est(self.q, x)

    model = Clip()
    x = torch.rand(64, 8) * 4  # mostly above the range: each clipped value pulls the step
    batches = [((x,), None)] * 4
    config = TrainConfig(epochs=2, lr=50.0, momentum=0.5, weight_decay=0.0)
    start = float(model.q.range_param.detach())
    train_classifier(model, batches, config, loss_fn=lambda out, t, i: (out**2).mean())
    step = float(model.q.range_param.detach())
    assert 0 < step < start / 10  # it was pulled down, and stopped above zero
    assert step == pytest.approx(start * LEARNED_RANGE_FLOOR)  # where it was held
