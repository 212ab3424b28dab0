"""Scoring a policy: analytic costs first (cheap reject), then the metric on validation data.

The metric is measured on the task's **validation** data, never on its test split, so the
test figure stays an honest final number:

- with ``metric=``, that function (``model -> float | dict``; it must read validation data);
- else, when the task's own metric scores its validation samples
  (``task.evaluate_on_validation``: an ``.npz`` with ``y``, a labelled image folder), that
  metric (its headline, e.g. ``top1``);
- else, when ``task.validation`` holds labelled ``(inputs, target)`` batches, top-1 (%) on
  them (``val_top1``), with the task's loss as a smoother sensitivity signal;
- else agreement (%) with the uncompressed model on ``task.validation`` (or, lacking it, the
  calibration inputs; the evaluator's ``notes`` say so), with ``KL(p_ref || p)`` of the
  first output's softmax as the loss (``1 - cosine`` when that output is one score).
  Why KL: it is the loss the Hessian-trace prices of weight bits are in
  (:mod:`edgeslim.search.hessian`), and ``greedy``/``dp`` add those prices to measured
  probe sensitivities; with ``1 - cosine`` the two were in different units.

Otherwise ``task.evaluate`` is deliberately not used: the built-in tasks score on their
test split.

The metric is taken as higher-is-better. Results are cached by policy id, so a strategy
that proposes a policy twice pays once. Optional short fine-tuning (QAT through the
fake-quant estimators, on the task's training batches) is off by default; BatchNorm is
already folded into the convolutions then, so give it a small learning rate (about 5e-3:
digits' 2-bit conv2 goes from 37% to 90% in two epochs on 512 images, 0.02 diverges).

Decision: a policy that changes the structure (channels cut, residual branches removed) is
first fine-tuned as the pruned float model, BatchNorm live, then quantized and given the
QAT pass: the cut needs the network to re-adapt, which BatchNorm does at once and a folded
network with fixed activation grids does badly, the more so the longer it trains. resnet20
on Fashion-MNIST (6-bit weights, three of nine residual branches removed, one epoch on 8,192
training images per pass, 1,000 validation images; ad hoc, 2026-12-02): QAT alone 89.4%
(65.5% with four removed), float then PTQ 91.7%, float then PTQ then QAT 92.5% (91.3%
through this evaluator in a second run); at 4-bit weights with one branch removed 93.7% /
92.2% / 93.6% (93.7%). Such a policy costs two passes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.errors import TaskError
from edgeslim.search.constraints import Check, Constraints, LatencyPredictor
from edgeslim.search.policy import Policy
from edgeslim.search.space import Costs, SearchSpace
from edgeslim.train.loop import TrainConfig, top1_hits

MetricFn = Callable[[nn.Module], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class EvalResult:
    """What one policy scored. ``evaluated`` is False when an analytic constraint rejected
    it before any accuracy was measured (``metric`` is then None)."""

    policy_id: str
    evaluated: bool
    metric: float | None
    baseline: float
    costs: Costs
    relative: dict[str, float]
    checks: tuple[Check, ...]
    feasible: bool
    violation: float
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    finetuned: bool = False

    @property
    def drop(self) -> float | None:
        """Points of the metric lost against the uncompressed model."""
        return None if self.metric is None else self.baseline - self.metric

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy_id": self.policy_id, "evaluated": self.evaluated, "metric": self.metric,
            "baseline": self.baseline, "costs": self.costs.to_dict(), "relative": self.relative,
            "checks": [c.to_dict() for c in self.checks], "feasible": self.feasible,
            "violation": self.violation, "loss": self.loss, "metrics": self.metrics,
            "seconds": self.seconds, "finetuned": self.finetuned,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        metric, loss = data.get("metric"), data.get("loss")
        return cls(
            policy_id=str(data["policy_id"]),
            evaluated=bool(data["evaluated"]),
            metric=None if metric is None else float(metric),
            baseline=float(data["baseline"]),
            costs=Costs.from_dict(data["costs"]),
            relative={str(k): float(v) for k, v in data["relative"].items()},
            checks=tuple(Check.from_dict(c) for c in data["checks"]),
            feasible=bool(data["feasible"]),
            violation=float(data["violation"]),
            loss=None if loss is None else float(loss),
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
            seconds=float(data.get("seconds", 0.0)),
            finetuned=bool(data.get("finetuned", False)),
        )

    def summary(self) -> str:
        head = "rejected before evaluation" if not self.evaluated else f"metric {self.metric:.4g}"
        state = "feasible" if self.feasible else "infeasible"
        checks = "".join(f"; {c}" for c in self.checks)
        return f"{head} ({state}){checks}"


class Evaluator:
    """Scores policies of ``space`` under ``constraints`` (strings or :class:`Constraints`)
    and ``max_drop`` (points of the metric); see the module doc for the metric."""

    def __init__(
        self,
        space: SearchSpace,
        constraints: Constraints | str | list[str] | None = None,
        *,
        max_drop: float | None = None,
        metric: MetricFn | None = None,
        metric_name: str = "metric",
        finetune: TrainConfig | None = None,
        finetune_limit: int | None = 2048,
        latency: LatencyPredictor | None = None,
    ) -> None:
        self.space = space
        self.task = space.task
        self.constraints = Constraints.parse(constraints, max_drop)
        self.constraints.require(latency)
        self.latency = latency
        self.finetune = finetune
        self.finetune_limit = finetune_limit
        self.notes: list[str] = []
        self._metric_fn = metric
        self._cache: dict[str, EvalResult] = {}
        self._baseline: float | None = None
        self._baseline_costs: Costs | None = None
        self._reference: Any = None
        self._val: list[tuple[tuple[torch.Tensor, ...], Any]] = []
        if metric is not None:
            self.mode, self.metric_name = "metric", metric_name
            self.notes.append(f"metric: {metric_name} from the given function")
        elif self.task.evaluate is not None and self.task.evaluate_on_validation:
            self.mode, self.metric_name = "task", self.task.headline
            self.notes.append(f"metric: the task's {self.metric_name} on its validation samples")
        elif (labelled := self.task.labelled_validation()) is not None:
            self.mode, self.metric_name = "labelled", "val_top1"
            self._val = labelled
            n = sum(int(t.numel()) for _, t in self._val)
            self.notes.append(f"metric: top-1 on {n} labelled validation samples")
        else:
            from edgeslim.task.agreement import AgreementReference

            self.mode = "agreement"
            self.task.choose_headline(space.model)
            self.notes.extend(self.task.notes)
            self.metric_name = self.task.primary or "agreement"
            batches = self.task.validation_batches()
            self._reference = AgreementReference.of(
                self.task.module(space.model), batches, self.task.chosen_class_axis
            )
            self._refuse_blind_agreement()
            where = "validation" if self.task.validation is not None else "calibration"
            self.notes.append(
                f"metric: {self.metric_name} with the uncompressed model on the {where} inputs"
                + ("" if where == "validation" else " (the task has no validation split)")
            )

        bn = space.bn_note()
        if bn is not None:
            self.notes.append(bn)

    def _refuse_blind_agreement(self) -> None:
        """A search cannot rank policies on agreement that cannot fall below 100 (every held
        score of a one-score output on one side of its threshold, :func:`one_sided`): every
        policy would tie, and ``max_drop`` would hold for any of them. The task only warns
        (a report can still show it); a search would choose blind, so it stops here."""
        from edgeslim.task.agreement import one_sided

        why = None if self.metric_name != "agreement" else one_sided(self._reference)
        if why is not None:
            raise TaskError(
                f"the search cannot rank policies on agreement here: {why}. Search on a "
                "metric that measures the values: --metric cosine (similarity to the "
                "uncompressed model's outputs; --max-drop then in cosine units, e.g. 0.01; "
                "Task(primary='cosine')) or --metric module:function (Task(evaluate=...))"
            )

    # --- measuring ------------------------------------------------------------------------

    def _score(self, model: nn.Module) -> tuple[float, dict[str, float], float | None]:
        """``(headline metric, all metrics, loss)`` of ``model`` on the validation data."""
        if self.mode == "metric":
            from edgeslim.task.core import _as_metrics

            assert self._metric_fn is not None
            metrics = _as_metrics(self._metric_fn(model), self.metric_name)
            return next(iter(metrics.values())), metrics, None
        if self.mode == "labelled":
            return self._top1_and_loss(model)
        if self.mode == "task":
            metrics = self.task.measure(model)
            return metrics[self.metric_name], metrics, None
        from edgeslim.task.agreement import agreement_metrics, prediction_divergence

        ref = self._reference
        outs = ref.outputs_of(self.task.module(model))
        metrics = agreement_metrics(ref, outs, self.task.min_confidence)
        kl = prediction_divergence(ref, outs)
        return metrics[self.metric_name], metrics, 1.0 - metrics["cosine"] if kl is None else kl

    @torch.no_grad()
    def _top1_and_loss(self, model: nn.Module) -> tuple[float, dict[str, float], float | None]:
        """Top-1 (%) as :func:`edgeslim.train.loop.evaluate` counts it, and the task's mean
        loss, in one pass over the validation batches."""
        loss_fn = self.task.train_loss()
        was = model.training
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        for inputs, target in self._val:
            out = model(*inputs)
            correct += top1_hits(out, target)
            n = int(target.numel())
            total += n
            loss_sum += float(loss_fn(out, target)) * n
        model.train(was)
        top1 = 100.0 * correct / max(total, 1)
        loss = loss_sum / max(total, 1)
        return top1, {"val_top1": top1, "val_loss": loss}, loss

    @property
    def baseline(self) -> float:
        """The uncompressed model's metric on the same data (measured once)."""
        if self._baseline is None:
            self._baseline = self._score(self.space.model)[0]
        return self._baseline

    @property
    def baseline_costs(self) -> Costs:
        if self._baseline_costs is None:
            self._baseline_costs = self.space.baseline_costs(self.latency)
        return self._baseline_costs

    def _costs(self, policy: Policy) -> tuple[Costs, dict[str, float], tuple[Check, ...]]:
        costs = self.space.costs(policy, self.latency)
        base = self.baseline_costs
        relative = {}
        for name in ("macs", "bops", "size", "memory", "latency"):
            v, b = costs.get(name), base.get(name)
            if v is not None and b:
                relative[name] = v / b
        return costs, relative, self.constraints.check_costs(costs, base)

    def checks(self, policy: Policy) -> tuple[Check, ...]:
        """The analytic constraints checked for ``policy`` (nothing is run)."""
        return self._costs(policy)[2]

    def screen(self, policy: Policy) -> EvalResult | None:
        """The rejection of ``policy`` when it breaks an analytic constraint, measured
        without running the model; None when it passes (it needs a real evaluation)."""
        costs, relative, checks = self._costs(policy)
        if all(c.ok for c in checks):
            return None
        return EvalResult(
            policy.id, False, None, self.baseline, costs, relative, checks, False,
            sum(c.excess for c in checks),
        )  # fmt: skip

    def measure(self, policy: Policy) -> EvalResult:
        """Apply, optionally fine-tune, and score ``policy`` (no cache: executors call this)."""
        start = time.perf_counter()
        costs, relative, checks = self._costs(policy)
        metric, metrics, loss = self._score(self.prepare(policy))
        drop = self.constraints.check_drop(self.baseline, metric)
        all_checks = checks + ((drop,) if drop is not None else ())
        return EvalResult(
            policy.id, True, metric, self.baseline, costs, relative, all_checks,
            all(c.ok for c in all_checks), sum(c.excess for c in all_checks), loss, metrics,
            time.perf_counter() - start, self.finetune is not None,
        )  # fmt: skip

    __call__ = measure

    def prepare(self, policy: Policy) -> nn.Module:
        """The model ``policy`` scores as: applied, and fine-tuned when the evaluator
        fine-tunes (what a chosen policy is exported and tested as); a cut structure is
        fine-tuned in float first (see the module doc)."""
        if self.finetune is None:
            return self.space.apply(policy)
        base = None
        if self.space.prunes(policy):
            base = self.space.pruned(policy)
            self._finetune(base)
        model = self.space.apply(policy, base)
        self._finetune(model)
        return model

    def _finetune(self, model: nn.Module) -> None:
        """A short pass on the task's training batches: QAT on a quantized model (its
        estimators sharpen to the end), plain training on a float one."""
        from edgeslim.distill import labels_or_teacher
        from edgeslim.quant.api import set_progress
        from edgeslim.train.loop import train_classifier

        assert self.finetune is not None
        cfg = self.finetune
        batches = self.task.train_batches(cfg.batch_size, self.finetune_limit, cfg.seed)
        # unlabelled batches distil from the uncompressed model (copied only if there are
        # any; not kept on the evaluator, which a parallel executor sends to its workers)
        loss = labels_or_teacher(
            self.task.train_loss(), self.space.model, values=self.task.value_outputs
        )
        train_classifier(
            model, batches, cfg, loss_fn=loss, description="search ft",
            on_step=lambda p: set_progress(model, p),
        )  # fmt: skip
        set_progress(model, 1.0)
        model.eval()

    # --- cache ------------------------------------------------------------------------------

    def cached(self, policy: Policy) -> EvalResult | None:
        return self._cache.get(policy.id)

    def remember(self, result: EvalResult) -> None:
        if result.evaluated:
            self._cache[result.policy_id] = result

    def evaluate(self, policy: Policy) -> EvalResult:
        """Screen, then measure (cached by policy id)."""
        hit = self.cached(policy)
        if hit is not None:
            return hit
        result = self.screen(policy) or self.measure(policy)
        self.remember(result)
        return result

    def describe(self) -> dict[str, Any]:
        """What decides the scores (the journal refuses to mix evaluators)."""
        ft = None
        if self.finetune is not None:
            ft = {**dataclasses.asdict(self.finetune), "limit": self.finetune_limit}
        return {
            "metric": self.metric_name,
            "mode": self.mode,
            "finetune": ft,
            "latency": None if self.latency is None else type(self.latency).__name__,
        }
