"""Recipe stage ``finetune``: train the (compressed) model on the Fashion-MNIST train split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from edgeslim.data import load_fashion_mnist
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
    train = load_fashion_mnist("train", limit=stage.limit)
    config = TrainConfig(
        epochs=stage.epochs, lr=stage.lr, batch_size=stage.batch_size, seed=stage.seed
    )
    history = train_classifier(model, train, config, description="finetune")
    ctx.notes.append(f"finetune: {stage.epochs} epoch(s), final loss {history[-1]['loss']:.4f}")
    return model.eval()
