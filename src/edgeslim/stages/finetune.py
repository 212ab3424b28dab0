"""Recipe stage ``finetune``: train the (compressed) model on the task's training data.

```yaml
- kind: finetune
  epochs: 1
  lr: 0.01
  batch_size: 128    # in-memory data is rebatched; a user's DataLoader keeps its own
  limit: null        # cap the training samples (in-memory data)
```

The loss is the task's (cross-entropy of the first output by default); a batch without
labels (an unlabelled ``.npz`` or image folder) is distilled from the uncompressed model
instead: KD, or its outputs matched as values when the task's headline is ``cosine``.
Augmentation is the task's (the Fashion-MNIST task crops and flips).
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field
from torch import nn

from edgeslim.recipe.schema import Stage, StageContext, register_stage
from edgeslim.train.loop import TrainConfig, train_classifier


class FinetuneStage(Stage):
    """Fine-tune with SGD and a OneCycle schedule; ``limit`` caps the training samples."""

    kind: Literal["finetune"] = "finetune"
    epochs: int = Field(1, ge=1, le=200)
    lr: float = Field(0.01, gt=0, le=1.0)
    batch_size: int = Field(128, ge=1, le=4096)
    limit: int | None = Field(None, ge=1)
    seed: int = 0


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
    history = train_classifier(model, train, config, loss_fn=loss, description="finetune")
    ctx.notes.append(
        f"finetune: {stage.epochs} epoch(s) on {task.name}, final loss {history[-1]['loss']:.4f}"
    )
    return model.eval()
