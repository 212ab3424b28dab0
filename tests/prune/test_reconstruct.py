"""Least-squares reconstruction of pruned layers: exact where the removed channels were
redundant, a real recovery on a shipped model, and clear refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.errors import PruneError
from edgeslim.graph import analyze
from edgeslim.prune.planner import apply_keep, plan_keep
from edgeslim.prune.reconstruct import _dense_targets, _fit_in_lockstep, reconstruct_
from edgeslim.prune.surgery import group_key, prepare_surgery
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


class _Pair(nn.Module):
    """Two layers with a ReLU between: the first's output channels are prunable."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def _with_duplicate(model: _Pair) -> _Pair:
    """Channel 5 of ``first`` a copy of channel 1: dropping 5 loses nothing the second
    layer cannot get back by doubling its weights on channel 1."""
    first = model.first
    assert isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    with torch.no_grad():
        first.weight[5] = first.weight[1]
        if first.bias is not None:
            first.bias[5] = first.bias[1]
    return model


def _drop_channel_5(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
    graph = analyze(model, x)
    group = next(g for g in graph.groups if group_key(g) == "first")
    keep = {group: [i for i in range(group.size) if i != 5]}
    pruned = copy.deepcopy(model)
    surgery = prepare_surgery(pruned, keep)
    kept = surgery.kept_positions()
    surgery.apply()
    return pruned, kept


@pytest.mark.parametrize(
    ("first", "second", "shape"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1, stride=2), (2, 3, 10, 10)),
        (nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 5, padding=2, bias=False), (2, 3, 16)),
        (
            nn.Conv3d(3, 8, 3, padding=1),
            nn.Conv3d(8, 4, (3, 1, 3), padding=(1, 0, 1), stride=(1, 2, 2)),
            (2, 3, 4, 8, 8),
        ),
        (nn.Linear(6, 8), nn.Linear(8, 4), (2, 5, 6)),
    ],
)
def test_a_redundant_channel_is_recovered_exactly(
    first: nn.Module, second: nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    dense = _with_duplicate(_Pair(first, second)).eval()
    x = torch.randn(*shape)
    pruned, kept = _drop_channel_5(dense, x[:1])
    assert kept["second"][1] is not None and 5 not in kept["second"][1].tolist()
    gap_before = (pruned(x) - dense(x)).abs().max().item()
    report = reconstruct_(pruned, dense, kept, [x, torch.randn(*shape)], ridge=1e-9, progress=False)
    assert [f.fqn for f in report.layers] == ["second"]
    assert report.layers[0].error_after < 1e-6 < report.layers[0].error_before
    held = torch.randn(*shape)
    assert (pruned(held) - dense(held)).abs().max().item() < 1e-3 < gap_before


def test_reconstruction_recovers_a_pruned_resnet20() -> None:
    """resnet20 at -50% MACs (l1, no fine-tuning): refitted on 256 validation images, top-1
    on 1,000 test images comes back from near chance."""
    dense = load_zoo_model("resnet20").eval()
    val = load_fashion_mnist("val", limit=256)
    test = load_fashion_mnist("test", limit=1000)
    x = val.images[:1]
    pruned = copy.deepcopy(dense)
    keep, _ = plan_keep(pruned, (x,), "l1", macs_reduction=0.5, round_to=4)
    kept = prepare_surgery(pruned, keep).kept_positions()
    apply_keep(pruned, keep, "l1")
    plain = evaluate(pruned, test)
    report = reconstruct_(pruned, dense, kept, TensorBatches(val.images, batch_size=64),
                          progress=False)  # fmt: skip
    assert report.layers and all(f.error_after <= f.error_before for f in report.layers)
    assert {f.fqn for f in report.layers} == {
        fqn for fqn, (_, inputs) in kept.items() if inputs is not None
    } - set(report.skipped)
    rebuilt = evaluate(pruned, test)
    assert rebuilt >= plain + 20, (plain, rebuilt)
    assert rebuilt >= evaluate(dense, test) - 15


def test_batches_run_at_once_fit_what_one_forward_per_layer_fits() -> None:
    """The lockstep pass (every batch's forward in its own thread, meeting at each layer)
    writes the same weights as fitting each layer from its own forwards, batch by batch."""
    dense = load_zoo_model("resnet20").eval()
    val = load_fashion_mnist("val", limit=96)
    pruned = copy.deepcopy(dense)
    keep, _ = plan_keep(pruned, (val.images[:1],), "l1", macs_reduction=0.4, round_to=4)
    kept = prepare_surgery(pruned, keep).kept_positions()
    apply_keep(pruned, keep, "l1")
    one_by_one = copy.deepcopy(pruned)
    batches = TensorBatches(val.images, batch_size=32)
    fast = reconstruct_(pruned, dense, kept, batches, rows_per_batch=500, progress=False)
    slow = reconstruct_(one_by_one, dense, kept, batches, rows_per_batch=500, progress=False,
                        max_lockstep_bytes=0)  # fmt: skip
    assert len(fast.layers) > 3 and [vars(f) for f in fast.layers] == [vars(f) for f in slow.layers]
    for (name, a), (_, b) in zip(
        pruned.state_dict().items(), one_by_one.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


class _Branchy(_Pair):
    """Takes ``second`` only when the batch's mean is positive: a path that depends on
    the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.second(h) if float(x.mean()) > 0 else h[:, :4]


def test_batches_that_take_different_paths_are_refused_not_hung() -> None:
    torch.manual_seed(0)
    pair = _Pair(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8).abs()
    cut, kept = _drop_channel_5(pair, x[:1])  # traced as the pair; run as the branchy model
    dense, pruned = _Branchy(pair.first, pair.second), _Branchy(cut.first, cut.second)
    with pytest.raises(PruneError, match="did not run"):  # seen on the unpruned model
        reconstruct_(pruned, dense, kept, [x, -x], progress=False)
    # the pruned model alone leaving a layer out on one batch: an error, not a thread that
    # waits for ever at the layer for the other batch
    targets = _dense_targets(dense, ["second"], kept, [(x,), (x,)], 100, 0)
    with pytest.raises(PruneError, match="`second` did not run on calibration batch 1"):
        _fit_in_lockstep(pruned, [("second", pruned.second)], [(x,), (-x,)], targets, 1e-3,
                         lambda: None)  # fmt: skip


def test_nothing_to_refit_is_refused() -> None:
    dense = _Pair(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(PruneError, match="nothing to do"):
        reconstruct_(copy.deepcopy(dense), dense, {"first": (torch.arange(6), None)},
                     [torch.randn(2, 3, 8, 8)], progress=False)  # fmt: skip
    with pytest.raises(PruneError, match="calibration data is empty"):
        reconstruct_(copy.deepcopy(dense), dense, {}, [], progress=False)


def test_kept_positions_that_do_not_fit_are_refused() -> None:
    torch.manual_seed(0)
    dense = _Pair(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    pruned, kept = _drop_channel_5(dense, x[:1])
    wrong = {"second": (torch.arange(3), kept["second"][1])}  # 3 outputs where it has 4
    with pytest.raises(PruneError, match="do not belong"):
        reconstruct_(pruned, dense, wrong, [x], progress=False)


class _SharedSecond(_Pair):
    """``second`` called twice per forward (once on a rescaled input): one weight to fit
    on the rows of both calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.second(h) + self.second(2.0 * h + 1.0)


@pytest.mark.parametrize("rows_per_batch", [4096, 37])  # every row; a sample across the calls
def test_a_layer_called_twice_is_fitted_on_both_calls(rows_per_batch: int) -> None:
    torch.manual_seed(0)
    dense = _with_duplicate(_SharedSecond(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)))
    dense.eval()
    x = torch.randn(2, 3, 9, 9)
    pruned, kept = _drop_channel_5(dense, x[:1])
    report = reconstruct_(pruned, dense, kept, [x, torch.randn(2, 3, 9, 9)], ridge=1e-9,
                          rows_per_batch=rows_per_batch, progress=False)  # fmt: skip
    (fit,) = report.layers
    # per batch: 2 images x 7 x 7 positions x 2 calls, or the sample drawn over them
    assert fit.fqn == "second" and fit.rows == 2 * min(2 * 7 * 7 * 2, rows_per_batch)
    assert fit.error_after < 1e-6 < fit.error_before
    held = torch.randn(2, 3, 9, 9)
    assert (pruned(held) - dense(held)).abs().max().item() < 1e-3


def test_a_layer_with_fewer_rows_than_weights_is_not_fitted_to_its_samples() -> None:
    """A linear with 32 inputs left, refitted on 16 samples: the plain least squares
    reproduces those samples and little else (its held-out error 0.45 against the cut's
    0.46). The cross-validated ridge must recover much of the cut's error on samples it did
    not see (measured 0.29) (a PReLU ResNet's classifier, 256 inputs fitted on 128 crops,
    fell from 13.3% to 6.7% top-1 under the plain fit)."""
    torch.manual_seed(0)
    dense = _Pair(nn.Linear(64, 64), nn.Linear(64, 5)).eval()
    x = torch.randn(1, 64)
    graph = analyze(dense, x)
    group = next(g for g in graph.groups if group_key(g) == "first")
    keep = {group: list(range(32))}
    pruned = copy.deepcopy(dense)
    surgery = prepare_surgery(pruned, keep)
    kept = surgery.kept_positions()
    surgery.apply()
    cut = copy.deepcopy(pruned)
    calib = [torch.randn(8, 64), torch.randn(8, 64)]
    reconstruct_(pruned, dense, kept, calib, progress=False)
    held = torch.randn(2000, 64)
    with torch.no_grad():
        want = dense(held)
        err_cut = float((cut(held) - want).pow(2).sum() / want.pow(2).sum())
        err_fit = float((pruned(held) - want).pow(2).sum() / want.pow(2).sum())
    assert err_fit <= 0.8 * err_cut, (err_fit, err_cut)
