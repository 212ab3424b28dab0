"""Data-aware low rank: the truncation of ``W S`` loses less output than plain SVD on the
inputs it was measured on, is exact at full rank, and pays off on a shipped model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.graph import layer_table
from edgeslim.lowrank import SVDConfig, TrainedRankPruning, TRPConfig, factorize_
from edgeslim.lowrank.modules import LowRankError, factorize_layer
from edgeslim.lowrank.ranks import candidates
from edgeslim.lowrank.whiten import Whitening, input_moments, whiten
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


def _correlated(n: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs of 16 features driven by 4 factors plus a little noise (strongly coloured)."""
    mix = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    return torch.randn(n, 4, generator=gen) @ mix + 0.05 * torch.randn(n, 16, generator=gen)


def _layer_and_candidate() -> tuple[nn.Sequential, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    (cand,), _ = candidates(model, layer_table(model, torch.randn(1, 16)))
    return model, cand


def test_data_aware_truncation_loses_less_output_than_plain_svd() -> None:
    model, cand = _layer_and_candidate()
    gen = torch.Generator().manual_seed(0)
    calib, held = _correlated(2048, gen), _correlated(1024, gen)
    moments = input_moments(model, ["0"], [calib])
    white = whiten(cand, Whitening.of(moments["0"]))  # type: ignore[arg-type]
    dense = model[0]
    errors = {}
    for name, c in (("plain", cand), ("data", white)):
        layer = factorize_layer(dense, 3, c.svd)  # type: ignore[attr-defined]
        with torch.no_grad():
            errors[name] = float((layer(held) - dense(held)).square().mean())
    assert errors["data"] < 0.2 * errors["plain"], errors
    full = factorize_layer(dense, 12, white.svd)
    torch.testing.assert_close(full(held), dense(held), rtol=1e-4, atol=1e-4)
    assert white.energy_at(4) > 0.99 > cand.energy_at(4)  # 4 factors: rank 4 keeps it all


def test_a_moment_of_the_wrong_width_is_refused() -> None:
    _, cand = _layer_and_candidate()
    with pytest.raises(LowRankError, match="16 inputs per output but its input moment is 8"):
        whiten(cand, Whitening.of(torch.eye(8)))  # type: ignore[arg-type]


def test_layers_that_do_not_run_on_the_calibration_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LowRankError, match="0 did not run"):
        input_moments(model, ["0"], [])


def test_data_aware_svd_keeps_far_more_of_resnet20() -> None:
    """resnet20 at -50% MACs, no fine-tuning: ranks and factors chosen on 256 training
    images keep far more test top-1 than plain SVD's."""
    dense = load_zoo_model("resnet20").eval()
    train = load_fashion_mnist("train", limit=256)
    test = load_fashion_mnist("test", limit=1000)
    x = test.images[:1]
    tops = {}
    for name, calib in (("plain", None), ("data", TensorBatches(train.images, batch_size=128))):
        model = copy.deepcopy(dense)
        report = factorize_(model, (x,), SVDConfig(macs_reduction=0.5, round_to=8),
                            calibration=calib)  # fmt: skip
        assert report.macs_reduction >= 0.5
        tops[name] = evaluate(model, test)
    assert tops["data"] >= tops["plain"] + 8, tops


def test_data_aware_trp_truncations_project_on_the_whitened_ranks() -> None:
    """With calibration, each truncation writes ``[W S]_r S^-1``: rank r exactly, and the
    output error on the calibration inputs no larger than plain SVD's at the same rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12))
    gen = torch.Generator().manual_seed(1)
    calib = [_correlated(512, gen)]
    x = calib[0]
    want = model(x).detach()
    plain = copy.deepcopy(model)
    trp = TrainedRankPruning(model, (x[:1],), TRPConfig(macs_reduction=0.3), calibration=calib)
    ranks = trp.truncate()
    TrainedRankPruning(plain, (x[:1],)).project(ranks)
    for fqn, r in ranks.items():
        w = model.get_submodule(fqn).weight.detach()
        assert torch.linalg.matrix_rank(w).item() == r
    err = float((model(x) - want).square().mean())
    err_plain = float((plain(x) - want).square().mean())
    assert err < err_plain, (err, err_plain)
