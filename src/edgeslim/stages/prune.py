"""Recipe stage ``prune``: plan, apply and (optionally) fine-tune with distillation.

```yaml
- kind: prune
  method: rank           # rank channels by a criterion, `gates`: learn binary gates, or
                         # `depth`: remove residual branches whole
  criterion: l1          # any registered importance criterion (edgeslim.prune.IMPORTANCE)
  macs_reduction: 0.5    # or ratio: 0.3 / {layer1.0.conv1: 0.5, "layer3.*": 0.25}
  global_ranking: true   # false: one uniform ratio for every group
  round_to: 8            # kept channel counts are multiples of 8 (default: auto, below)
  finetune_epochs: 1     # 0: no fine-tune
  lr: 0.005
  batch_size: 32
  kd: true               # distil from the unpruned model while fine-tuning
  kd_alpha: 0.9          # weight of the distillation term (the rest is cross-entropy)
  limit: 10000           # training samples of the task for the fine-tune (null: all)
  allow_target_miss: false  # true: a MACs reduction more than 2 points off target is kept
  reconstruct: false     # true: refit the layers that lost inputs by least squares
  reconstruct_samples: 128  # calibration samples the refit reads
  select_every: 0        # n >= 2: every n-th training sample chooses the fine-tune's epoch
```

``round_to`` unset (auto): with ``method: rank`` and a MACs target, the coarsest of 8, 4,
2, 1 whose plan meets the target (the note names it); otherwise 1. Why: ONNX Runtime's
conv kernels work on blocks of 8/16 channels, and free widths ran slower than the
unpruned model: 16 torchvision/timm CNNs at -30% MACs (``l1``, random weights, 3x128x128;
ad hoc, docs/pruning.md), 10 of them below 1.0x fp32 with free widths (EfficientNet-B0
0.78x, MobileNetV3-Small 0.60x, MNASNet 0.59x), all 16 rounded to 8 at the same target
faster than fp32 (1.04-1.46x; those three 1.24x, 1.18x, 1.41x). ``method: gates`` keeps 1
unless set (the gates choose the widths as they train; rounding them is ``round_to``).

The MACs reduction is measured on the model before and after the surgery (the layer
table), never taken from the planner's estimate. When it misses ``macs_reduction`` by
more than :data:`~edgeslim.prune.config.MACS_TOLERANCE` (2 points) the stage fails,
naming requested vs achieved, unless ``allow_target_miss: true``: the miss is then a
``WARNING:`` note that the record and ``report.md`` carry.

``method: gates`` trains one binary gate per channel jointly with the weights
(:func:`edgeslim.prune.gates.train_gates`, ``gate_epochs`` epochs with the same ``lr``,
``batch_size``, ``limit`` and KD as the fine-tune) to the ``macs_reduction`` target, removes
the channels whose gates end off, then fine-tunes as usual; ``criterion``, ``ratio`` and
``global_ranking`` do not apply to it (gates choose every width, rounded to ``round_to``).

``reconstruct: true`` (``method: rank`` or ``gates``): right after the surgery, every layer
that lost input channels is refitted by least squares to give the unpruned layer's outputs
on ``reconstruct_samples`` of the task's calibration samples
(:func:`edgeslim.prune.reconstruct.reconstruct_`; no labels read), before the fine-tune. On
``mobilenetv2-imagenet`` at -30% MACs (``l1``) it takes agreement before fine-tuning from 0%
to about 95%; after learned gates (trained 6 epochs on 198 crops) from 61.9% to 91.5%,
and from 34.7% to 90.7% at -50% (docs/pruning.md). With gates the refit targets the
model from before the gates trained.

``select_every: n`` (n >= 2, with a fine-tune): every n-th training sample is held out of
the fine-tune, and the stage keeps the epoch that scores best on them, the pruned model
before any training included (:func:`edgeslim.train.loop.train_classifier`'s
``keep_best``): top-1 on their labels, or agreement with the unpruned model's top-1 when the
task's training data has none. A model that starts close to the unpruned one (after
``reconstruct``) can lose to a fine-tune that overfits a few hundred samples; only samples it
does not train on show that. It needs in-memory training data (a task built from tensors, a
folder, an ``.npz``) and class scores (not value outputs). The held samples are kept out of
training only: when the task calibrates on its training samples, ``reconstruct`` may read
them.

``method: depth`` removes residual branches whole (:func:`edgeslim.prune.depth.depth_prune_`:
of the sets of branches that reach ``macs_reduction``, the one whose removals change the
outputs least on the task's calibration samples; BatchNorm statistics re-estimated), then
fine-tunes as usual. Branches come whole, so the reduction reached is at least the target
and may pass it by up to a branch's share (the note says by how much); ``criterion``,
``ratio``, ``global_ranking`` and ``round_to`` do not apply. Its plan file,
``model.plan.json``, names the removed branches (``"format": "edgeslim-depth-plan"``).

Data comes from the run's task: its example inputs (tracing), its training batches (the
importance criteria that need data, the gates, the fine-tune) and its loss. When the task's
training data has no labels (``target`` None), the fine-tune and the gates learn from the
unpruned model's soft targets alone (KD), so ``kd`` must stay on.

The plan is written to ``<out>/model.plan.json`` so the pruned weights can be rebuilt
with :func:`edgeslim.prune.load_pruned` (``<out>/model`` as the stem).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from edgeslim.artifacts import free_plan_path
from edgeslim.data.batching import TensorBatches
from edgeslim.errors import PruneError, UnreachableTargetError
from edgeslim.recipe.schema import Stage, StageContext, register_stage
from edgeslim.runtime.machine import KERNEL_BLOCK
from edgeslim.train.loop import TrainConfig, steps_per_epoch
from edgeslim.train.selection import held_out_for_stage, held_score_name, kept_note

if TYPE_CHECKING:
    from edgeslim.graph.coupling import CouplingGroup
    from edgeslim.prune.config import PruneConfig
    from edgeslim.prune.plan import PrunePlan
    from edgeslim.task import Task

# gate steps below which the gates cannot have learned much: the gates' SGD moves each gate
# by ~gate_lr x 1e-3 a step (prune.gates), so a few steps leave them where they started and
# the final projection alone picks the channels
MIN_GATE_STEPS = 50
# steps an unset round_to tries, coarsest first (module doc)
AUTO_ROUND_TO = (KERNEL_BLOCK, 4, 2, 1)


class PruneStage(Stage):
    """Structured pruning to a MACs target or fixed ratios, then a short fine-tune."""

    kind: Literal["prune"] = "prune"
    method: Literal["rank", "gates", "depth"] = "rank"
    criterion: str = "l1"
    macs_reduction: float | None = Field(None, gt=0.0, lt=1.0)
    ratio: float | dict[str, float] | None = None
    global_ranking: bool = True
    round_to: int | None = Field(None, ge=1, le=256)  # None: auto (module doc)
    max_group_ratio: float = Field(0.9, gt=0.0, lt=1.0)
    latency_weight: float = Field(0.0, ge=0.0, le=4.0)
    skip: tuple[str, ...] = ()
    gate_epochs: int = Field(1, ge=1, le=200)
    finetune_epochs: int = Field(1, ge=0, le=200)
    lr: float = Field(0.005, gt=0, le=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    kd: bool = True
    kd_alpha: float = Field(0.9, ge=0.0, le=1.0)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    allow_target_miss: bool = False
    reconstruct: bool = False
    reconstruct_samples: int = Field(128, ge=1)
    select_every: int = Field(0, ge=0)

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        """An unknown name fails at load time, listing the registered criteria."""
        from edgeslim.prune.importance import check_criterion

        return check_criterion(v)  # a ValueError naming the registered criteria

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        from edgeslim.prune.config import check_ratios

        try:
            check_ratios(v)
        except PruneError as exc:  # as a pydantic error, located at the field
            raise ValueError(str(exc)) from None
        return v

    def prune_config(self, round_to: int | None = None) -> PruneConfig:
        """The planner's options this stage declares, as the planner's own config
        (``round_to``: the step chosen for an auto stage, else the stage's, else 1)."""
        from edgeslim.prune.config import PruneConfig

        options = {name: getattr(self, name) for name in PruneConfig.names()}  # same names
        options["round_to"] = round_to or self.round_to or 1
        return PruneConfig(**options)

    def auto_steps(self) -> tuple[int, ...]:
        """The ``round_to`` values to plan with, coarsest first (module doc)."""
        if self.round_to is not None:
            return (self.round_to,)
        if self.method == "rank" and self.macs_reduction is not None:
            return AUTO_ROUND_TO
        return (1,)

    @model_validator(mode="after")
    def _one_budget(self) -> PruneStage:
        try:
            self.prune_config()  # the planner's own checks: one budget, ranges, the tilt
        except PruneError as exc:
            raise ValueError(str(exc)) from None
        if self.method == "gates" and self.macs_reduction is None:
            raise ValueError("method gates needs macs_reduction (gates learn the widths)")
        if self.method == "depth" and self.macs_reduction is None:
            raise ValueError("method depth needs macs_reduction (branches are removed to it)")
        if self.reconstruct and self.method == "depth":
            raise ValueError(
                "reconstruct refits the layers a channel surgery narrowed: it needs method "
                "rank or gates (depth removes whole branches)"
            )
        if self.latency_weight and self.method != "rank":
            raise ValueError("latency_weight tilts the planner's ranking: it needs method rank")
        if self.select_every == 1 or (self.select_every and not self.finetune_epochs):
            raise ValueError(
                "select_every holds every n-th training sample out to choose the fine-tune's "
                "epoch: it needs n >= 2 (0 turns it off) and finetune_epochs >= 1"
            )
        return self


def _plan_path(out: Path) -> Path:
    """``model.plan.json``, or ``model.plan.<k>.json`` for a later prune stage of the recipe."""
    return free_plan_path(out, "model.plan")


def _train_config(stage: PruneStage, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=stage.lr, batch_size=stage.batch_size, seed=stage.seed)


def _samples(train: Iterable[Any]) -> str:
    n = getattr(train, "num_samples", None)
    return f"{n} samples" if n is not None else "the task's training batches"


def _teacher_words(teacher: nn.Module | None, task: Task) -> str:
    """How the fine-tune learnt from the unpruned model, for the stage's note."""
    if teacher is None:
        return ""
    if task.value_outputs:
        return " matching the unpruned model's outputs as values"
    return " with KD from the unpruned model"


def _value_loss(teacher: nn.Module | None, ctx: StageContext, alpha: float) -> Any:
    """For a task whose outputs are values, the loss that matches the teacher's outputs
    (a softmax KD would read them as class scores); else None, the trainer's KD default."""
    from edgeslim.distill import teacher_loss

    task = ctx.task
    if teacher is None or task is None or not task.value_outputs:
        return None
    return teacher_loss(task.train_loss(), teacher, alpha, values=True)


def _prune_by_gates(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    train: Iterable[Any],
    stage: PruneStage,
    teacher: nn.Module | None,
    ctx: StageContext,
) -> PrunePlan:
    """Learned gates to the MACs target (model pruned in place); returns the plan (saved)."""
    from edgeslim.prune.config import MACS_TOLERANCE
    from edgeslim.prune.gates import train_gates

    assert stage.macs_reduction is not None  # the validator guarantees it

    def run(reduction: float) -> Any:
        return train_gates(
            model, example, train, _train_config(stage, stage.gate_epochs),
            macs_reduction=reduction, teacher=teacher, description="gates",
            round_to=stage.round_to or 1, task_loss=_value_loss(teacher, ctx, stage.kd_alpha),
            max_overshoot=MACS_TOLERANCE,  # the gap _check_target accepts
        )  # fmt: skip

    try:
        result = run(stage.macs_reduction)
    except UnreachableTargetError as exc:  # refused before training: the model is untouched
        if not stage.allow_target_miss or exc.best <= 0.0:
            raise
        ctx.notes.append(
            f"WARNING: prune: -{stage.macs_reduction:.1%} MACs is out of reach of the learned "
            f"gates ({exc.best:.1%} at most); trained to that because allow_target_miss is true"
        )
        result = run(exc.best - 1e-6)  # the floor exactly: float rounding must not miss it
    plan = result.plan
    steps = stage.gate_epochs * steps_per_epoch(train)
    if steps < MIN_GATE_STEPS:
        ctx.notes.append(
            f"WARNING: prune: the learned gates took {steps} step(s) (under {MIN_GATE_STEPS}): "
            "too few to learn which channels matter, so the channels removed are close to an "
            "arbitrary choice; give the stage more samples (`limit`) or `gate_epochs`, or "
            "rank channels instead (`method: rank`)"
        )
    if ctx.model_name:
        plan = dataclasses.replace(plan, name=ctx.model_name)
    plan_path = plan.save(_plan_path(Path(ctx.out)))
    ctx.notes.append(
        f"prune: learned gates, {stage.gate_epochs} epoch(s) on {_samples(train)}; "
        f"{len(plan.keep)} group(s) narrowed; plan {plan_path.name}"
    )
    return plan


def _macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    from edgeslim.graph import layer_table, total_macs

    return int(total_macs(layer_table(model, *example)))


def _check_target(stage: PruneStage, achieved: float, name: str, step: int | None = None) -> str:
    """The note on the measured MACs reduction; a miss beyond 2 points fails the stage
    unless ``allow_target_miss`` (then the note starts with ``WARNING:``)."""
    from edgeslim.prune.config import MACS_TOLERANCE

    if stage.macs_reduction is None:
        return f"prune: MACs -{achieved:.1%} measured (ratio budget, no MACs target)"
    requested = stage.macs_reduction
    if stage.method == "depth" and achieved >= requested - 1e-9:
        return (
            f"prune: MACs -{achieved:.1%} measured (target -{requested:.0%}; whole residual "
            f"branches: {(achieved - requested) * 100:.1f} points past it)"
        )
    if abs(achieved - requested) <= MACS_TOLERANCE:
        return f"prune: MACs -{achieved:.1%} measured (target -{requested:.0%})"
    text = (
        f"the prune stage asked for -{requested:.1%} MACs on {name or 'the model'} and "
        f"achieved -{achieved:.1%} (measured; allowed gap {MACS_TOLERANCE * 100:.0f} points)"
    )
    if stage.allow_target_miss:
        return f"WARNING: prune target missed: {text}; kept because allow_target_miss is true"
    keep = (
        "or set `allow_target_miss: true` on the stage to keep the result (the report then "
        "shows the miss)."
    )
    if stage.method == "depth":  # branches come whole; channel options do not apply
        raise PruneError(
            f"{text}: the residual branches removed fall short of the target (they come "
            f"whole, each its own share of the MACs): lower the target, {keep}"
        )
    step = step or stage.round_to or 1
    if achieved > requested:
        raise PruneError(
            f"{text}: more was removed than asked. On this model the smallest step is coarse "
            f"(a channel of a coupled group, round_to {step}) or the learned gates switched "
            f"off more than the target: lower round_to or change the target, {keep}"
        )
    raise PruneError(
        f"{text}. Coupled channels, round_to {step}, max_group_ratio "
        f"{stage.max_group_ratio} and skipped layers limit what can be removed: adjust them "
        f"or the target, {keep}"
    )


def _plan_within_reach(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    criterion: Any,
    stage: PruneStage,
    ctx: StageContext,
) -> tuple[dict[CouplingGroup, list[int]], int]:
    """The planner's keep sets for the stage's budget and the ``round_to`` they use (an auto
    stage: the coarsest of :data:`AUTO_ROUND_TO` that meets the target); with
    ``allow_target_miss``, a MACs target out of reach is planned at the most the groups can
    remove, and noted. A plan missing the target (coarse ``round_to``) fails before any
    surgery unless allowed."""
    import warnings

    from edgeslim.errors import UnreachableTargetError
    from edgeslim.prune.config import MACS_TOLERANCE
    from edgeslim.prune.importance.base import ScoredOnce
    from edgeslim.prune.planner import PruneWarning, plan_keep

    steps = stage.auto_steps()
    if len(steps) > 1:  # each try plans afresh; the criterion reads its data once
        criterion = ScoredOnce(criterion)
    for step in steps:
        # the stage checks the measured reduction itself (_check_target), in a recipe's words
        config = dataclasses.replace(stage.prune_config(step), allow_target_miss=True)
        last = step == steps[-1]
        try:
            with warnings.catch_warnings():  # a coarse try's warnings are not the result's
                if not last:
                    warnings.simplefilter("ignore", PruneWarning)
                keep, stats = plan_keep(model, example, criterion, config)
        except UnreachableTargetError as exc:
            if not last:
                continue
            if not stage.allow_target_miss or exc.best <= 0.0:
                raise
            ctx.notes.append(
                f"WARNING: prune: -{stage.macs_reduction:.1%} MACs is out of reach "
                f"({exc.best:.1%} at most); planned at that because allow_target_miss is true"
            )
            reachable = dataclasses.replace(config, macs_reduction=exc.best)
            with warnings.catch_warnings():  # the groups left whole were named a moment ago
                warnings.simplefilter("ignore", PruneWarning)
                return plan_keep(model, example, criterion, reachable)[0], step
        target = stage.macs_reduction
        if not last and target is not None and abs(stats.macs_reduction - target) > MACS_TOLERANCE:
            continue  # too coarse for this target: a finer step
        if len(steps) > 1:
            ctx.notes.append(
                f"prune: round_to {step} (auto: the coarsest of "
                f"{', '.join(map(str, steps))} that meets the target; ONNX Runtime's conv "
                "kernels work on blocks of 8/16 channels)"
            )
        # the plan's reduction is measured on a pruned copy: a miss fails here, before the
        # surgery, refit and fine-tune it would otherwise wait for (checked again after them)
        _check_target(stage, stats.macs_reduction, ctx.model_name, step)
        return keep, step
    raise AssertionError("unreachable: the last step returns or raises")


def rebuild_prune(
    model: nn.Module, plan_path: Path, example: tuple[torch.Tensor, ...]
) -> nn.Module:
    """Re-apply a saved plan to a model of the original shape (reload: weights come after)."""
    import json

    from edgeslim.errors import CheckpointError
    from edgeslim.prune.depth import DEPTH_PLAN_FORMAT, rebuild_depth
    from edgeslim.prune.plan import PrunePlan, apply_plan

    try:
        data = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{plan_path}: not a prune plan ({exc})") from None
    if isinstance(data, dict) and data.get("format") == DEPTH_PLAN_FORMAT:
        try:
            return rebuild_depth(model, data.get("removed"), example).eval()
        except PruneError as exc:
            raise CheckpointError(f"{plan_path}: {exc}") from None
    return apply_plan(model, PrunePlan.load(plan_path), example).eval()


def _prune_depth(
    model: nn.Module, example: tuple[torch.Tensor, ...], stage: PruneStage, ctx: StageContext
) -> Path:
    """Residual branches removed to the MACs target (model changed in place); returns the
    plan's path. With ``allow_target_miss`` a target beyond every branch removes them all."""
    import json

    from edgeslim.errors import UnreachableTargetError
    from edgeslim.prune.depth import DEPTH_PLAN_FORMAT, depth_prune_

    assert stage.macs_reduction is not None  # the stage's validator
    task = ctx.need_task("prune")
    batches = task.calibration_batches(256)
    dim = (task.batch_dims or (0,))[0]  # the first input's batch axis (a state's may be 1)
    try:
        _, removed, _ = depth_prune_(model, example, batches, stage.macs_reduction)
    except UnreachableTargetError as exc:
        if not stage.allow_target_miss:
            raise
        ctx.notes.append(f"WARNING: {exc}; every branch removed (allow_target_miss)")
        _, removed, _ = depth_prune_(model, example, batches, exc.best - 1e-6)
    path = _plan_path(Path(ctx.out))
    path.write_text(json.dumps({"format": DEPTH_PLAN_FORMAT, "removed": removed}, indent=1))
    ctx.notes.append(
        f"prune: depth, {len(removed)} residual branch(es) removed ({', '.join(removed)}), "
        f"chosen on {sum(int(b[0].shape[dim]) for b in batches)} calibration samples; plan "
        f"{path.name}"
    )
    return path


def _reconstruct(
    model: nn.Module, dense: nn.Module, kept: Any, stage: PruneStage, ctx: StageContext
) -> None:
    """Least-squares refit of the narrowed layers on the task's calibration samples."""
    from edgeslim.prune.reconstruct import reconstruct_

    task = ctx.need_task("prune reconstruct")
    batches = task.calibration_batches(stage.reconstruct_samples)
    report = reconstruct_(model, dense, kept, batches, seed=stage.seed)
    dim = (task.batch_dims or (0,))[0]
    n = sum(int(b[0].shape[dim]) for b in batches)
    ctx.notes.append(f"prune {report.summary()}, on {n} calibration samples")


@register_stage("prune", PruneStage, data_used="train")
def run_prune(model: nn.Module, stage: PruneStage, ctx: StageContext) -> nn.Module:
    from edgeslim.graph.attention import split_attention
    from edgeslim.prune.finetune import finetune_pruned
    from edgeslim.prune.plan import PrunePlan, plan_kept_positions
    from edgeslim.prune.planner import apply_keep, build_importance
    from edgeslim.prune.surgery import prepare_surgery

    task = ctx.need_task("prune")
    example = task.example_inputs
    needs_data = (
        stage.method == "gates"
        or stage.finetune_epochs > 0
        or stage.criterion in ("taylor", "fluctuation")
    )
    train = task.train_batches(stage.batch_size, stage.limit, stage.seed) if needs_data else None
    wants_teacher = stage.kd and (stage.finetune_epochs or stage.method == "gates")
    teacher = copy.deepcopy(model).eval() if wants_teacher else None
    select: TensorBatches | None = None
    held_name = held_score_name(train) if train is not None else "val_top1"
    if stage.select_every:
        assert train is not None
        train, select = held_out_for_stage(train, stage.select_every, teacher, task)
    model.eval()
    ctx.out.mkdir(parents=True, exist_ok=True)
    macs_before = _macs(model, example)
    attention = split_attention(model)
    split = [f for f, what in attention.items() if what == "split"]
    if split:
        ctx.notes.append(
            f"prune: {len(split)} nn.MultiheadAttention split into q/k/v/out linears (same "
            f"outputs) so their heads can be pruned: {', '.join(split)}"
        )
    for fqn, why in attention.items():
        if why != "split":
            ctx.notes.append(f"prune: the heads of {fqn} stay whole: {why}")
    # the refit's reference: the unpruned model as split (the fqns the plan names); the
    # teacher, copied before the split, only when there was no attention to split (its
    # encoders could still run fused, where hooks see nested tensors or nothing)
    dense = None
    if stage.reconstruct:
        same = teacher is not None and not attention
        dense = teacher if same else copy.deepcopy(model).eval()
    step = stage.round_to or 1  # the rank planner's auto choice replaces it
    if stage.method == "gates":
        assert train is not None
        plan = _prune_by_gates(model, example, train, stage, teacher, ctx)
        if dense is not None:
            # the positions the gates kept, of the model before them: refit each narrowed
            # layer to give what the unpruned one gave on its kept outputs
            _reconstruct(model, dense, plan_kept_positions(dense, plan, example), stage, ctx)
    elif stage.method == "depth":
        _prune_depth(model, example, stage, ctx)
    else:
        criterion = build_importance(stage.criterion, train, stage.seed)
        keep, step = _plan_within_reach(model, example, criterion, stage, ctx)
        plan = PrunePlan.from_groups(model, keep, example, name=ctx.model_name)
        kept = prepare_surgery(model, keep).kept_positions() if stage.reconstruct else {}
        apply_keep(model, keep, criterion)
        if dense is not None:
            _reconstruct(model, dense, kept, stage, ctx)
        plan_path = plan.save(_plan_path(Path(ctx.out)))
        budget = "" if stage.ratio is None else f"ratio {stage.ratio}; "
        mode = "global ranking" if stage.global_ranking else "uniform"
        if stage.latency_weight:
            mode += f" tilted by fp32 latency per MAC (weight {stage.latency_weight})"
        ctx.notes.append(
            f"prune: {stage.criterion}, {mode}, round_to {step}; {budget}"
            f"{len(keep)} group(s) narrowed; plan {plan_path.name}"
        )
    achieved = 1.0 - _macs(model, example) / max(macs_before, 1)
    ctx.notes.append(_check_target(stage, achieved, ctx.model_name, step))
    if stage.finetune_epochs:
        assert train is not None
        config = _train_config(stage, stage.finetune_epochs)
        history = finetune_pruned(
            model, train, config, teacher=teacher, alpha=stage.kd_alpha, description="prune ft",
            hard_loss=task.train_loss(), loss_fn=_value_loss(teacher, ctx, stage.kd_alpha),
            val=select, keep_best=select is not None, val_name=held_name,
        )  # fmt: skip
        ctx.notes.append(
            f"prune fine-tune: {stage.finetune_epochs} epoch(s) on {_samples(train)}"
            f"{_teacher_words(teacher, task)}, "
            f"final loss {history[-1]['loss']:.4f}{kept_note(history, select, held_name)}"
        )
    return model.eval()
