"""A seeded classification training loop with augmentation, OneCycle LR and a progress bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgeslim.data.fashion_mnist import Split
from edgeslim.data.loaders import batches
from edgeslim.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (frozen so a card can record them)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    pad: int = 2
    seed: int = 0
    channels_last: bool = True


def augment_batch(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` pixels, and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
    out = out.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent; restores the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(split, batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(split), 1)


def train_classifier(
    model: nn.Module,
    train: Split,
    config: TrainConfig,
    val: Split | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    description: str = "train",
    on_step: Callable[[float], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns one ``{epoch, loss, val_top1}`` dict per epoch.

    ``loss_fn(logits, labels, images)`` replaces cross-entropy when given (distillation).
    ``on_step(progress)`` is called before every step with the fraction of training done
    (QAT uses it to sharpen AQE/tanh estimators and advance the n-BQ blend).
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    sched: torch.optim.lr_scheduler.LRScheduler
    if total_steps >= 8:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=total_steps, pct_start=0.25
        )
    else:  # too few steps for a warm-up and an anneal: keep the learning rate constant
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    ce = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict[str, float]] = []
    model.train()
    step = 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=total_steps)
        for epoch in range(config.epochs):
            total, seen = 0.0, 0
            for x, y in batches(train, config.batch_size, shuffle=True, generator=gen):
                if on_step is not None:
                    on_step(step / max(total_steps - 1, 1))
                step += 1
                if config.augment:
                    x = augment_batch(x, config.pad, gen)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = model(x)
                loss = loss_fn(logits, y, x) if loss_fn is not None else ce(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                seen += len(y)
                bar.update(task, advance=1, description=f"{description} ep{epoch + 1}")
            row = {"epoch": float(epoch + 1), "loss": total / max(seen, 1)}
            if val is not None:
                row["val_top1"] = evaluate(model, val)
            history.append(row)
            bar.console.log(", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return history
