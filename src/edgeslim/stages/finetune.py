"""Recipe stage ``finetune``: train the (compressed) model on the task's training data.

```yaml
- kind: finetune
  epochs: 1
  lr: 0.01
  batch_size: 128    # in-memory data is rebatched; a user's DataLoader keeps its own
  limit: null        # cap the training samples (in-memory data)
  select_every: 0    # n >= 2: every n-th training sample chooses the epoch kept
```

The loss is the task's (cross-entropy of the first output by default); a batch without
labels (an unlabelled ``.npz`` or image folder) is distilled from the uncompressed model
instead: KD, or its outputs matched as values when the task's headline is ``cosine``.
Augmentation is the task's (the Fashion-MNIST task crops and flips).

``select_every: n`` holds every n-th training sample out and keeps the epoch that scores best
on them, the model as it came in included (:mod:`edgeslim.train.selection`): top-1 on their
labels, or agreement with the uncompressed model when they have none. It needs in-memory
training data and class scores.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from edgeslim.recipe.schema import Stage, StageContext, register_stage
from edgeslim.train.loop import TrainConfig, train_classifier
from edgeslim.train.selection import held_out_for_stage, held_score_name, kept_note


class FinetuneStage(Stage):
    """Fine-tune with SGD and a OneCycle schedule; ``limit`` caps the training samples."""

    kind: Literal["finetune"] = "finetune"
    epochs: int = Field(1, ge=1, le=200)
    lr: float = Field(0.01, gt=0, le=1.0)
    batch_size: int = Field(128, ge=1, le=4096)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    select_every: int = Field(0, ge=0)

    @field_validator("select_every")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("select_every: 1 would hold every sample out; use n >= 2 (0: off)")
        return v


@register_stage("finetune", FinetuneStage, data_used="train")
def run_finetune(model: nn.Module, stage: FinetuneStage, ctx: StageContext) -> nn.Module:
    task = ctx.need_task("finetune")
    train = task.train_batches(stage.batch_size, stage.limit, stage.seed)
    config = TrainConfig(
        epochs=stage.epochs, lr=stage.lr, batch_size=stage.batch_size, seed=stage.seed
    )
    from edgeslim.distill import labels_or_teacher

    # unlabelled batches distil from the uncompressed model (or the model as it came in)
    teacher = ctx.reference if ctx.reference is not None else copy.deepcopy(model).eval()
    loss = labels_or_teacher(task.train_loss(), teacher, values=task.value_outputs)
    held = None
    name = held_score_name(train)
    if stage.select_every:
        train, held = held_out_for_stage(train, stage.select_every, teacher, task)
    from edgeslim.quant import quant_layers, set_progress

    # quantized layers follow their estimators' schedules (AQE, tanh, n-BQ sharpen from
    # smooth to the hard quantizer) over this training, and end hard; a float model has none
    on_step = partial(set_progress, model) if quant_layers(model) else None
    try:
        history = train_classifier(model, train, config, val=held, loss_fn=loss,
                                   description="finetune", keep_best=held is not None,
                                   val_name=name, on_step=on_step)  # fmt: skip
    finally:
        if on_step is not None:
            set_progress(model, 1.0)
    ctx.notes.append(
        f"finetune: {stage.epochs} epoch(s) on {task.name}, final loss {history[-1]['loss']:.4f}"
        f"{kept_note(history, held, name)}"
    )
    return model.eval()
