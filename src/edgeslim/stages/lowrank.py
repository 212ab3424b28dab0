"""Recipe stage ``lowrank``: factorize convs and linears into two smaller layers each.

```yaml
- kind: lowrank
  method: svd          # svd: factorize, then fine-tune; trp: train low-rank, then factorize
  macs_reduction: 0.5  # of the whole model's MACs (met, or the stage fails); null: energy
  energy: 0.9          # without a MACs target: the share of squared singular values kept
  round_to: 8          # ranks in multiples of 8 (ONNX Runtime's conv kernels block by 8)
  skip: []             # FQNs, globs or re: patterns left dense (e.g. the first conv)
  epochs: 1            # svd: fine-tune epochs after (0: none, no data read); trp: training
  lr: 0.01
  batch_size: 64
  kd: true             # distil from the model as it entered the stage
  kd_alpha: 0.9
  limit: null          # cap the training samples (in-memory data)
  seed: 0
  period: 10           # trp: optimizer steps between truncations
  lam: 0.0003          # trp: nuclear-norm weight
  data_aware: false    # true: ranks/factors keep the output energy on calibration inputs
  calibration_samples: 256  # data_aware: the task's calibration samples read
```

``data_aware: true``: each truncation is the one that loses the least *output* on the
task's calibration inputs (the SVD of ``W S``, ``S`` the root of the layer's input second
moment; :mod:`edgeslim.lowrank.whiten`), for SVD's factorization and every TRP truncation;
it reads ``calibration_samples`` samples (no labels).

Each factorized ``k x k`` conv becomes a ``k x k`` conv with ``rank`` outputs then a 1x1
conv; a linear becomes two linears (:mod:`edgeslim.lowrank`). Later stages (quantize,
prune) see plain layers. The ranks are saved as ``model.plan.lowrank.json`` so
:func:`edgeslim.load` rebuilds the structure before loading the weights.

Decision — ``method: svd`` by default with KD fine-tuning: on resnet20 at -50% MACs (3
epochs, 10,000 Fashion-MNIST images) post-hoc SVD + KD fine-tune and TRP end level (93.33
and 93.29, ``benchmarks/train``; docs/lowrank.md), and SVD reads no data when ``epochs``
is 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from edgeslim.artifacts import free_plan_path
from edgeslim.recipe.schema import Stage, StageContext, register_stage

if TYPE_CHECKING:
    from edgeslim.lowrank.report import LowRankReport

PLAN_NAME = "model.plan.lowrank"


class LowRankStage(Stage):
    """Factorize with post-hoc SVD (+ fine-tune) or TRP; see the module doc."""

    kind: Literal["lowrank"] = "lowrank"
    method: Literal["svd", "trp"] = "svd"
    macs_reduction: float | None = Field(0.5, gt=0.0, lt=1.0)
    energy: float = Field(0.9, gt=0.0, le=1.0)
    round_to: int = Field(8, ge=1, le=256)
    skip: tuple[str, ...] = ()
    epochs: int = Field(1, ge=0, le=200)
    lr: float = Field(0.01, gt=0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    kd: bool = True
    kd_alpha: float = Field(0.9, ge=0.0, le=1.0)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    period: int = Field(10, ge=1)
    lam: float = Field(3e-4, ge=0.0)
    data_aware: bool = False
    calibration_samples: int = Field(256, ge=1)


def _save_ranks(out: Path, ranks: dict[str, int], method: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = free_plan_path(out, PLAN_NAME)  # ...lowrank.<k>.json for a later lowrank stage
    path.write_text(json.dumps({"kind": "lowrank", "method": method, "ranks": ranks}, indent=1))
    return path


def rebuild_lowrank(
    model: nn.Module, plan_path: Path, example: tuple[torch.Tensor, ...]
) -> nn.Module:
    """Factorize a model of the stage's input shape at the saved ranks (reload: the saved
    weights are loaded afterwards)."""
    from edgeslim.errors import CheckpointError
    from edgeslim.lowrank import factorize_

    try:
        ranks = json.loads(Path(plan_path).read_text())["ranks"]
        ranks = {str(k): int(v) for k, v in ranks.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{plan_path}: not a lowrank plan ({exc})") from None
    report = factorize_(model, example, ranks=ranks)
    if {r.fqn: r.kept_rank for r in report.layers} != ranks:
        raise CheckpointError(
            f"{plan_path}: the model does not factorize at the saved ranks (another model, "
            "or one changed since); rebuild from the model the output was made from"
        )
    return model.eval()


def _loss(stage: LowRankStage, teacher: nn.Module | None, task: Any) -> Any:
    """Distillation from ``teacher`` (:func:`edgeslim.distill.teacher_loss`), or the
    task's loss alone without one."""
    from edgeslim.distill import teacher_loss

    hard = task.train_loss()
    if teacher is not None:
        return teacher_loss(hard, teacher, stage.kd_alpha, task.value_outputs)
    return lambda outputs, target, _inputs: hard(outputs, target)


@register_stage("lowrank", LowRankStage, data_used="train")
def run_lowrank(model: nn.Module, stage: LowRankStage, ctx: StageContext) -> nn.Module:
    from edgeslim.lowrank import SVDConfig, TRPConfig, factorize_, trp_train
    from edgeslim.train.loop import TrainConfig, train_classifier

    task = ctx.need_task("lowrank")
    example = task.example_inputs
    model.eval()
    if stage.method == "trp" and stage.epochs < 1:
        from edgeslim.errors import RecipeError

        raise RecipeError("lowrank: method trp trains the model low-rank: epochs must be >= 1")
    teacher = copy.deepcopy(model).eval() if stage.kd and stage.epochs else None
    config = TrainConfig(
        epochs=max(stage.epochs, 1), lr=stage.lr, batch_size=stage.batch_size, seed=stage.seed
    )
    calib = task.calibration_batches(stage.calibration_samples) if stage.data_aware else None
    if stage.method == "svd":
        svd = SVDConfig(stage.energy, stage.macs_reduction, stage.skip, stage.round_to)
        report = factorize_(model, example, svd, calibration=calib)
        if stage.epochs:
            train = task.train_batches(stage.batch_size, stage.limit, stage.seed)
            train_classifier(
                model, train, config, loss_fn=_loss(stage, teacher, task), description="svd ft"
            )
    else:
        train = task.train_batches(stage.batch_size, stage.limit, stage.seed)
        trp = TRPConfig(
            energy=stage.energy, lam=stage.lam, period=stage.period,
            macs_reduction=stage.macs_reduction, skip=stage.skip, round_to=stage.round_to,
        )  # fmt: skip
        report = trp_train(
            model, train, config, example, trp, loss_fn=_loss(stage, teacher, task),
            calibration=calib,
        ).report  # fmt: skip
    ranks = {r.fqn: r.kept_rank for r in report.layers}
    path = _save_ranks(Path(ctx.out), ranks, stage.method)
    ctx.notes.append(f"lowrank: {report.summary()}; ranks {path.name}")
    _note_overshoot(report, ctx)
    if calib is not None:
        n = sum(int(b[0].shape[(task.batch_dims or (0,))[0]]) for b in calib)
        ctx.notes.append(f"lowrank: data-aware ranks and factors, from {n} calibration samples")
    if report.skipped:
        shown = "; ".join(
            f"{k}: {v.removeprefix('left dense: ')}" for k, v in list(report.skipped.items())[:4]
        )
        more = len(report.skipped) - 4
        ctx.notes.append(f"lowrank: left dense: {shown}" + (f"; {more} more" if more > 0 else ""))
    if stage.epochs:
        what = "fine-tuned" if stage.method == "svd" else "trained with TRP"
        how = "matching as values the outputs of" if task.value_outputs else "with KD from"
        kd = f" {how} the model before the stage" if teacher is not None else ""
        ctx.notes.append(f"lowrank: {what} for {stage.epochs} epoch(s){kd}")
    return model.eval()


def _note_overshoot(report: LowRankReport, ctx: StageContext) -> None:
    """A ``WARNING:`` note when the ranks remove more than :data:`MACS_TOLERANCE` beyond
    the requested MACs: the target is met, but the accuracy paid for the extra cut was not
    asked for. Ranks move in steps of ``round_to``, so on a model with few factorizable
    layers the smallest step past the target can be large (a two-conv model at -30%
    removed 39.3%)."""
    from edgeslim.prune.config import MACS_TOLERANCE

    asked = report.requested_macs_reduction
    if asked is None or report.macs_reduction - asked <= MACS_TOLERANCE:
        return
    ctx.notes.append(
        f"WARNING: lowrank removed {report.macs_reduction:.1%} of the MACs for the "
        f"-{asked:.0%} asked (more than {MACS_TOLERANCE:.0%} beyond): its ranks move in steps "
        "of `round_to` over few layers; a smaller `round_to` (1) gets closer"
    )
