"""The evaluator: validation data only (never the task's test metric), a cache by policy
id, agreement when the validation data has no labels, and optional short fine-tuning."""

from __future__ import annotations

import pytest
import torch
from search_helpers import N_TRAIN, CountingTestMetric, make_task
from torch import nn

from edgeslim.data import TensorBatches, load_digits_split
from edgeslim.errors import TaskError
from edgeslim.search import EvalResult, Evaluator, SearchError, SearchSpace
from edgeslim.task import Task
from edgeslim.task.agreement import model_outputs, prediction_divergence
from edgeslim.train.loop import TrainConfig, evaluate


def test_scores_on_validation_never_on_the_test_split(
    space: SearchSpace, digits_task: Task
) -> None:
    test_metric = digits_task.evaluate
    assert isinstance(test_metric, CountingTestMetric)
    before = test_metric.calls
    ev = Evaluator(space, ["size<=0.2x"])
    policy = space.uniform(4)
    result = ev.evaluate(policy)
    train = load_digits_split("train")
    val = TensorBatches(train.images[N_TRAIN:], train.labels[N_TRAIN:], batch_size=100)
    assert result.metric == evaluate(space.apply(policy), val)  # top-1 on the 300 held images
    assert ev.baseline == evaluate(space.model, val)
    assert ev.metric_name == "val_top1" and result.loss is not None and result.loss > 0
    assert result.feasible and result.evaluated and result.drop == ev.baseline - result.metric
    assert test_metric.calls == before


def test_results_are_cached_by_policy_id(space: SearchSpace) -> None:
    calls: list[nn.Module] = []

    def metric(model: nn.Module) -> float:
        calls.append(model)
        return 50.0

    ev = Evaluator(space, metric=metric, metric_name="custom")
    first = ev.evaluate(space.uniform(4))
    second = ev.evaluate(space.uniform(4))
    assert second is first and len(calls) == 2  # the baseline and one measurement
    assert first.metrics == {"custom": 50.0} and first.loss is None
    again = EvalResult.from_dict(first.to_dict())
    assert again == first


def test_max_drop_decides_feasibility(space: SearchSpace) -> None:
    ev = Evaluator(space, "drop<=1")
    ok = ev.evaluate(space.uniform(8))
    broken = ev.evaluate(space.uniform(2))  # 2-bit weights everywhere: the network collapses
    assert ok.feasible and ok.drop is not None and ok.drop <= 1
    assert not broken.feasible and broken.drop is not None and broken.drop > 50
    (check,) = broken.checks
    assert check.constraint == "drop<=1" and check.achieved == broken.drop and not check.ok


def test_agreement_when_validation_has_no_labels(digits_model: nn.Module) -> None:
    task = make_task(labelled=False)
    sp = SearchSpace.build(digits_model, task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    ev = Evaluator(sp)
    assert ev.metric_name == "agreement" and ev.baseline == 100.0
    assert "validation inputs" in ev.notes[0]
    w8, w2 = ev.evaluate(sp.uniform(8)), ev.evaluate(sp.uniform(2))
    assert w8.metric is not None and w2.metric is not None
    assert w8.metric >= 97.0 > w2.metric
    assert w8.loss is not None and w2.loss is not None and 0.0 <= w8.loss < w2.loss
    # the loss is the divergence of the predictions, in the Hessian prices' unit (nats)
    ref = ev._reference
    out = model_outputs(sp.apply(sp.uniform(2)), ref.batches)
    assert w2.loss == pytest.approx(prediction_divergence(ref, out), rel=1e-6)


def test_short_finetuning_recovers_accuracy(digits_model: nn.Module, digits_task: Task) -> None:
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    policy = sp.uniform(8).replace(w_bits={"conv2": 2})
    plain = Evaluator(sp).evaluate(policy)
    cfg = TrainConfig(epochs=2, lr=0.005, batch_size=64, seed=0, channels_last=False)
    tuned = Evaluator(sp, finetune=cfg, finetune_limit=512).evaluate(policy)
    assert tuned.finetuned and not plain.finetuned
    assert plain.metric is not None and tuned.metric is not None
    assert tuned.metric > plain.metric + 10
    bare = Task(example_inputs=digits_task.example_inputs, calibration=digits_task.calibration)
    untrainable = Evaluator(SearchSpace.build(digits_model, bare, keep=(1.0,)), finetune=cfg)
    with pytest.raises(TaskError, match="no training data"):
        untrainable.evaluate(untrainable.space.uniform(8))


def test_short_finetuning_without_labels_distils_from_the_uncompressed_model(
    digits_model: nn.Module,
) -> None:
    """Unlabelled training data (an .npz without y): the fine-tune is KD from the model
    searched, not cross-entropy (which refused the missing labels)."""
    from dataclasses import replace

    x = load_digits_split("train").images[:N_TRAIN]
    task = replace(
        make_task(labelled=False), train=TensorBatches(x, None, 64, shuffle=True, pairs=True)
    )
    sp = SearchSpace.build(digits_model, task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    policy = sp.uniform(8).replace(w_bits={"conv2": 2})
    plain = Evaluator(sp).evaluate(policy)
    cfg = TrainConfig(epochs=2, lr=0.005, batch_size=64, seed=0, channels_last=False)
    tuned = Evaluator(sp, finetune=cfg, finetune_limit=512).evaluate(policy)
    assert plain.metric is not None and tuned.metric is not None and tuned.finetuned
    assert tuned.metric > plain.metric + 5  # agreement with the uncompressed model


def test_bn_recalibration_after_pruning_scores_the_cut_model_fairly(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """Pruned without re-estimated BatchNorm statistics, a model is scored far below what
    its widths allow; the space re-estimates them on the calibration samples by default."""
    scores = {}
    for recal in (False, True):
        sp = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 1.0),
                               bn_recalibration=recal, reconstruct=False)  # fmt: skip
        scores[recal] = Evaluator(sp, ["size<=1x"]).evaluate(sp.uniform(keep=0.5)).metric
        assert sp.to_dict()["bn_recalibration"] is recal  # part of the journal's identity
    assert scores[True] is not None and scores[False] is not None
    assert scores[True] > scores[False]


def test_reconstruct_refits_pruned_policies_when_first_measured(
    digits_model: nn.Module, digits_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``reconstruct``, a pruned policy's narrowed layers are refitted by least squares
    (once, when first measured; not when screened), in place of BatchNorm re-estimation:
    the float model then stays closer to the unpruned one than with re-estimation alone."""
    import edgeslim.prune.reconstruct as rc
    import edgeslim.train.batchnorm as bn

    calls: list[str] = []
    fit, est = rc.reconstruct_, bn.reestimate_bn
    monkeypatch.setattr(rc, "reconstruct_", lambda *a, **k: calls.append("fit") or fit(*a, **k))
    monkeypatch.setattr(bn, "reestimate_bn", lambda *a, **k: calls.append("bn") or est(*a, **k))
    x = digits_task.calibration_batches(256)[0][0]
    with torch.no_grad():
        want = digits_model(x)
    errors = {}
    for refit in (False, True):
        sp = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 1.0),
                               reconstruct=refit)  # fmt: skip
        half = sp.uniform(keep=0.5)
        sp.costs(half)
        calls.clear()
        first, again = sp.pruned(half), sp.pruned(half)
        assert calls == (["fit"] if refit else ["bn"])  # once, and only one of the two
        assert all(
            torch.equal(a, b)
            for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
        )
        with torch.no_grad():
            errors[refit] = float((first(x) - want).pow(2).mean() / want.pow(2).mean())
        assert sp.to_dict().get("reconstruct", False) is refit  # part of the space's identity
        assert any(("refitted by least squares" in n) is refit for n in Evaluator(sp).notes)
    assert errors[True] < errors[False]


def test_the_refit_is_on_by_default_wherever_it_can_run(
    digits_model: nn.Module, digits_task: Task
) -> None:
    def default(task: Task, **kwargs: object) -> bool:
        return SearchSpace.build(digits_model, task, w_bits=(8,), **kwargs).reconstruct  # type: ignore[arg-type]

    assert default(digits_task, keep=(0.5, 1.0))
    assert not default(digits_task, keep=(1.0,))  # nothing pruned
    assert not default(digits_task, keep=(0.5, 1.0), depth=True)
    assert not default(Task(example_inputs=digits_task.example_inputs), keep=(0.5, 1.0))


def test_a_pruned_model_with_nothing_to_refit_falls_back_to_batchnorm_saying_so(
    digits_model: nn.Module, digits_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the refit finds no layer it can fit (only grouped convs narrowed, say), the
    search goes on: the model's BatchNorm statistics are re-estimated, with a warning."""
    import edgeslim.prune.reconstruct as rc
    import edgeslim.train.batchnorm as bn
    from edgeslim.errors import PruneError

    def nothing(*_a: object, **_k: object) -> None:
        raise PruneError("reconstruct: no pruned layer lost input channels that can be refitted")

    calls: list[int] = []
    est = bn.reestimate_bn
    monkeypatch.setattr(rc, "reconstruct_", nothing)
    monkeypatch.setattr(bn, "reestimate_bn", lambda *a, **k: calls.append(1) or est(*a, **k))
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 1.0),
                           reconstruct=True)  # fmt: skip
    with pytest.warns(UserWarning, match="re-estimated instead"):
        sp.pruned(sp.uniform(keep=0.5))
    assert calls == [1]


def test_reconstruct_is_refused_where_it_has_nothing_to_refit(
    digits_model: nn.Module, digits_task: Task
) -> None:
    for kwargs in ({"keep": (1.0,)}, {"keep": (0.5, 1.0), "depth": True}):
        with pytest.raises(SearchError, match="reconstruct refits"):
            SearchSpace.build(digits_model, digits_task, reconstruct=True, **kwargs)
    unlabelled = Task(example_inputs=digits_task.example_inputs)
    with pytest.raises(SearchError, match="calibration"):
        SearchSpace.build(digits_model, unlabelled, keep=(0.5, 1.0), reconstruct=True)


def test_screening_costs_does_not_re_estimate_batchnorm_measuring_does(
    digits_model: nn.Module, digits_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search screens many policies for each it measures: their costs read shapes only,
    so BatchNorm is re-estimated when a pruned model is first measured, once, and the
    measured model is the same as when it was re-estimated up front."""
    import edgeslim.train.batchnorm as bn

    calls = []
    real = bn.reestimate_bn
    monkeypatch.setattr(bn, "reestimate_bn", lambda *a, **k: calls.append(1) or real(*a, **k))
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 1.0),
                           reconstruct=False)  # fmt: skip
    half = sp.uniform(keep=0.5)
    sp.costs(half)
    sp.layer_table(half)
    assert calls == []
    first = sp.pruned(half)
    again = sp.pruned(half)
    assert len(calls) == 1
    fresh = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(0.5, 1.0),
                              reconstruct=False)  # fmt: skip
    other = fresh.pruned(fresh.uniform(keep=0.5))
    for a, b in zip(first.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pairs = zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_the_notes_say_what_happens_to_batchnorm_after_pruning(
    space: SearchSpace, digits_model: nn.Module, digits_task: Task
) -> None:
    assert any("refitted by least squares" in n for n in Evaluator(space).notes)  # default
    bn = SearchSpace.build(digits_model, digits_task, keep=(0.5, 1.0), reconstruct=False)
    assert any("BatchNorm statistics re-estimated" in n for n in Evaluator(bn).notes)
    off = SearchSpace.build(digits_model, digits_task, keep=(0.5, 1.0), bn_recalibration=False,
                            reconstruct=False)  # fmt: skip
    assert any("not re-estimated: turned off" in n for n in Evaluator(off).notes)
    no_bn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.LazyLinear(10))  # fmt: skip
    no_bn(digits_task.example_inputs[0])  # materialise the lazy layer
    plain = SearchSpace.build(no_bn.eval(), digits_task, keep=(0.5, 1.0), reconstruct=False)
    assert any("not re-estimated: the model has no BatchNorm" in n for n in Evaluator(plain).notes)
    bits_only = SearchSpace.build(digits_model, digits_task, w_bits=(4, 8), keep=(1.0,))
    assert not any("BatchNorm" in n for n in Evaluator(bits_only).notes)


def test_a_labelled_npz_task_is_searched_on_its_own_metric(
    digits_model: nn.Module, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """An ``.npz`` with ``y`` scores top-1 on its held samples, which are its validation
    samples: the search optimises that metric (it optimised agreement, a different figure
    from the one the command then reported)."""
    import numpy as np

    from edgeslim.task import npz_task

    split = load_digits_split("test")
    path = tmp_path / "digits.npz"
    np.savez(path, x=split.images.numpy(), y=split.labels.numpy())
    task = npz_task(path)
    assert task.evaluate_on_validation
    sp = SearchSpace.build(digits_model, task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    ev = Evaluator(sp)
    assert ev.metric_name == "top1" and "the task's top1" in ev.notes[0]
    assert ev.baseline == task.measure(digits_model)["top1"] < 100.0
    w8, w2 = ev.evaluate(sp.uniform(8)), ev.evaluate(sp.uniform(2))
    assert w8.metric is not None and w2.metric is not None and w8.metric > w2.metric


class _Distance(nn.Module):
    """A one-score output that is never negative (a distance): agreement cannot fail."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x.flatten(1)) - self.b(x.flatten(1))).norm(dim=1)


def test_a_search_refuses_agreement_that_cannot_fall() -> None:
    # a distance is above the 0 threshold for every held sample: agreement read 100 for
    # every policy, so a search ranked nothing and any --max-drop held (W4, keep 0.5 chosen
    # at cosine 0.84 on a Siamese net); cosine, asked for, measures the values
    torch.manual_seed(0)
    x = load_digits_split("train").images[:96]

    def task(primary: str | None = None) -> Task:
        return Task(example_inputs=(x[:1],), calibration=TensorBatches(x[:64], batch_size=32),
                    validation=TensorBatches(x[64:], batch_size=32), primary=primary)  # fmt: skip

    model = _Distance().eval()
    with pytest.raises(TaskError, match="--metric cosine"):
        Evaluator(SearchSpace.build(model, task(), w_bits=(2, 8), keep=(1.0,)), "drop<=1")
    ev = Evaluator(SearchSpace.build(model, task("cosine"), w_bits=(2, 8), keep=(1.0,)))
    assert ev.metric_name == "cosine"
    w8, w2 = ev.evaluate(ev.space.uniform(8)), ev.evaluate(ev.space.uniform(2))
    assert w8.metric is not None and w2.metric is not None and w8.metric > w2.metric
