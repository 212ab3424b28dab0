"""TRP on a small CNN trained on sklearn digits.

The gradient term is exactly ``lam * U_r V_r^T``; truncation runs every ``period`` steps;
TRP-trained weights have a lower nuclear norm (relative to their Frobenius norm) and energy
rank than the same network trained without it; the factorized result meets its MACs
target, computes what the trained weights projected on the final ranks compute, fx-traces,
exports to ONNX, and beats post-hoc SVD of the plainly trained network at the same MACs
(neither fine-tuned; over four data orders TRP kept 95.5-97.1% top-1 at -60% MACs, SVD
81.1-89.3%).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches
from edgeslim.data.digits import load_digits_split
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs, trace
from edgeslim.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    SVDConfig,
    TrainedRankPruning,
    TRPConfig,
    TRPResult,
    energy_rank,
    factorize_,
    nuclear_norm,
    trp_train,
)
from edgeslim.runtime.ort import ort_session
from edgeslim.train.loop import TrainConfig, evaluate, train_classifier

CFG = TrainConfig(epochs=6, lr=0.1)
LAYERS = ("3", "6")  # the two 3x3 convs worth factorizing


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def batches(train) -> TensorBatches:  # type: ignore[no-untyped-def]
    """Fresh (so the same) shuffled batches for every model trained here."""
    return TensorBatches(train.images, train.labels, 64, shuffle=True)


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits_split("train"), load_digits_split("test")


@pytest.fixture(scope="module")
def plain(digits) -> nn.Module:  # type: ignore[no-untyped-def]
    model = cnn()
    train_classifier(model, batches(digits[0]), CFG)
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits) -> tuple[TRPResult, nn.Module]:  # type: ignore[no-untyped-def]
    """TRP-trained to -60% MACs and factorized; the dense weights projected on the final
    ranks, copied just before the factorization."""
    model = cnn()
    example = (digits[1].images[:1],)
    trp = TrainedRankPruning(model, example, TRPConfig(period=25, macs_reduction=0.6))
    with trp:
        history = train_classifier(model, batches(digits[0]), CFG, on_step=trp.on_step)
    assert trp.final_ranks is not None and set(trp.final_ranks) == set(LAYERS)
    projected = copy.deepcopy(model).eval()
    TrainedRankPruning(projected, example).project(trp.final_ranks)
    report = trp.factorize()
    return TRPResult(model.eval(), history, report, trp.rank_history), projected


def test_gradient_gets_the_nuclear_norm_subgradient() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 8)
    trp = TrainedRankPruning(nn.Sequential(layer), (torch.randn(1, 12),), TRPConfig(lam=0.1))
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    r = energy_rank(layer.weight, 0.9)
    assert 1 <= r < 8 and float(s[:r].square().sum() / s.square().sum()) >= 0.9
    with trp:
        (layer(torch.randn(3, 12)).sum() * 0).backward()
    torch.testing.assert_close(layer.weight.grad.double(), 0.1 * u[:, :r] @ vh[:r])
    layer.weight.grad = None
    (layer(torch.randn(3, 12)).sum() * 0).backward()  # detached: no term any more
    assert torch.count_nonzero(layer.weight.grad) == 0


def test_truncation_every_period(digits) -> None:  # type: ignore[no-untyped-def]
    model = cnn()
    trp = TrainedRankPruning(model, (digits[1].images[:1],), TRPConfig(period=3))
    for _ in range(10):  # 10 steps: truncations before steps 4, 7 and 10
        trp.on_step()
    assert len(trp.rank_history) == 3
    for fqn, rank in trp.rank_history[-1].items():
        w = model.get_submodule(fqn).weight
        assert torch.linalg.matrix_rank(w.detach().reshape(w.shape[0], -1)).item() == rank


def test_truncation_with_a_macs_target_keeps_the_target_ranks(digits) -> None:  # type: ignore[no-untyped-def]
    model = cnn()
    example = (digits[1].images[:1],)
    trp = TrainedRankPruning(model, example, TRPConfig(period=3, macs_reduction=0.5))
    before = total_macs(layer_table(model, *example))
    for _ in range(4):
        trp.on_step()
    (ranks,) = trp.rank_history
    svd = copy.deepcopy(model)
    report = factorize_(svd, example, SVDConfig(macs_reduction=0.5), ranks=ranks)
    assert report.macs_after <= 0.5 * before
    for fqn, rank in ranks.items():
        w = model.get_submodule(fqn).weight
        assert torch.linalg.matrix_rank(w.detach().reshape(w.shape[0], -1)).item() == rank


def test_trp_lowers_nuclear_norm_and_rank(trained, plain: nn.Module) -> None:  # type: ignore[no-untyped-def]
    _, dense = trained
    for fqn in LAYERS:
        w_trp, w_plain = dense.get_submodule(fqn).weight, plain.get_submodule(fqn).weight
        ratio_trp = nuclear_norm(w_trp) / float(w_trp.detach().norm())
        ratio_plain = nuclear_norm(w_plain) / float(w_plain.detach().norm())
        assert ratio_trp < 0.9 * ratio_plain
        assert energy_rank(w_trp, 0.9) < energy_rank(w_plain, 0.9)


def test_factorized_result_meets_the_target_and_computes_the_projection(trained, digits) -> None:  # type: ignore[no-untyped-def]
    result, projected = trained
    test = digits[1]
    example = (test.images[:1],)
    report = result.report
    assert report.method == "trp" and result.rank_history
    assert [r.fqn for r in report.layers] == list(LAYERS)
    for fqn in LAYERS:
        assert isinstance(result.model.get_submodule(fqn), LowRankConv2d)
    before = total_macs(layer_table(projected, *example))
    assert report.macs_before == before
    assert total_macs(layer_table(result.model, *example)) == report.macs_after
    assert report.requested_macs_reduction == 0.6 and report.macs_after <= 0.4 * before
    with torch.no_grad():
        torch.testing.assert_close(
            result.model(test.images[:100]), projected(test.images[:100]), atol=1e-4, rtol=1e-4
        )


def test_trp_beats_post_hoc_svd_at_the_same_macs(trained, plain: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    result, _ = trained
    test = digits[1]
    svd = copy.deepcopy(plain)
    report = factorize_(
        svd, (test.images[:1],), SVDConfig(macs_reduction=result.report.macs_reduction)
    )
    assert report.macs_after <= result.report.macs_after * 1.02
    acc_trp, acc_svd = evaluate(result.model, test), evaluate(svd, test)
    assert acc_trp > 90.0
    assert acc_trp > acc_svd + 3.0, (acc_trp, acc_svd)


def test_trp_train_exports_to_onnx(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    model = cnn()
    short = TrainConfig(epochs=1, lr=0.1)
    steps: list[float] = []
    data = batches(train)
    result = trp_train(
        model, data, short, (test.images[:1],), TRPConfig(period=5, round_to=4),
        on_step=steps.append,
    )  # fmt: skip
    frozen = next(i for i, p in enumerate(steps) if p >= 0.9)  # truncations before steps 6, 11..
    assert len(result.rank_history) == (frozen - 1) // 5
    assert all(r.kept_rank % 4 == 0 or r.kept_rank == r.max_rank for r in result.report.layers)
    assert isinstance(model.get_submodule("11"), LowRankLinear | nn.Linear)
    traced = trace(model)
    x = test.images[:16]
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    path = export_onnx(model, (x[:1],), tmp_path / "trp.onnx")
    session = ort_session(path)
    for batch in (x[:1], x):
        got = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(batch), atol=1e-4, rtol=1e-4)


def test_a_ramp_reaches_the_macs_target_gradually(digits) -> None:  # type: ignore[no-untyped-def]
    """Early truncations keep more rank than the target's; from the ramp's end on, the
    target's ranks (the same as without a ramp on the same weights)."""
    example = (digits[1].images[:1],)
    trp = TrainedRankPruning(
        cnn(), example, TRPConfig(period=3, macs_reduction=0.5, ramp=0.5, freeze_at=0.9)
    )
    for i in range(30):  # truncations at progress 0.1, 0.2, ... 0.8, then frozen at 0.9
        trp.on_step(i / 30)
    full = 32  # both factorizable convs have 32 outputs; a layer not listed is not cut

    def total(ranks: dict[str, int]) -> int:
        return sum(ranks.get(fqn, full) for fqn in LAYERS)

    sums = [total(r) for r in trp.rank_history]
    assert len(sums) == 8 and sums[0] > sums[-1]
    assert sums == sorted(sums, reverse=True)  # never more rank later
    plain = TrainedRankPruning(cnn(), example, TRPConfig(period=3, macs_reduction=0.5))
    for _ in range(4):
        plain.on_step()
    assert sums[0] > total(plain.rank_history[0])  # the first cut is milder
    assert trp._ramped(0.5) == 0.5  # past the ramp: the target itself
    trp._progress = 0.25  # half-way: 1 - 0.5^3 of it
    assert trp._ramped(0.5) == pytest.approx(0.5 * 0.875)


def test_ramp_must_end_before_the_ranks_freeze() -> None:
    from edgeslim.lowrank.modules import LowRankError

    with pytest.raises(LowRankError, match="ramp must be in"):
        TRPConfig(macs_reduction=0.5, ramp=0.95, freeze_at=0.9)
