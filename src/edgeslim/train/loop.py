"""A seeded training loop over plain batch iterables, with OneCycle LR and a progress bar.

The loop takes ``(inputs, target)`` batches as they come (see :mod:`edgeslim.data.batching`):
shuffling and augmentation are the data source's business (``TensorBatches(...,
shuffle=True, transform=crop_flip())``), so one loop serves images, several inputs and
label-free distillation alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import (
    Batch,
    Inputs,
    TensorBatches,
    as_batch,
    batch_size_of,
    flat_outputs,
    is_one_shot,
)
from edgeslim.data.fashion_mnist import Split
from edgeslim.errors import TaskError
from edgeslim.progress import progress_bar

LossFn = Callable[[Any, Any, Inputs], torch.Tensor]
"""``loss(outputs, target, inputs)``: the model's outputs, the batch target, its inputs."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (frozen so a card can record them).

    ``batch_size`` is not read by the loop (it trains on the batches it is given); it is
    the size callers build their batches with (zoo training, recipe stages), kept here so a
    card records it. ``channels_last``: train in that memory format (faster convs on CPU);
    a model whose forward ``.view()``s an activation, which that layout cannot do, is
    trained in its own layout instead from its first batch on.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0
    channels_last: bool = True


def first_output(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: the tensor itself, or the first tensor of a
    tuple/list or of a dict (its first value, as agreement reads a model's outputs; a
    Hugging Face ``ModelOutput`` is one)."""
    flat = flat_outputs(outputs)
    if flat:
        return flat[0]
    raise TypeError(
        "expected a tensor, a tuple/list or a dict of tensors as model output; "
        f"got {type(outputs).__name__}"
    )


def classes_last(scores: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Class scores with the classes on the last axis.

    Decision: an output of 4 or more dims, ``(N, C, H, W[, D])``, holds its classes on axis 1
    (dense prediction: torchvision's segmentation models, ``F.cross_entropy``'s own layout);
    one of 1 to 3 dims holds them last (``(N, C)``, a sequence's ``(N, T, C)``). ``axis``
    overrides the rule (a Conv1d's per-frame ``(N, C, T)`` scores: 1; see
    :attr:`edgeslim.Task.class_axis`)."""
    if axis is not None and scores.dim() > 1:
        return scores.movedim(axis, -1)
    return scores.movedim(1, -1) if scores.dim() >= 4 else scores


def class_logits(outputs: Any, axis: int | None = None) -> torch.Tensor:
    """The first output as ``(samples, classes)``: classes (:func:`classes_last`, ``axis``
    overriding its rule) on the last dimension, every other dimension (a sequence's
    positions, an image's pixels) flattened into samples."""
    logits = classes_last(first_output(outputs), axis)
    return logits if logits.dim() <= 2 else logits.reshape(-1, logits.shape[-1])


def labels_class_axis(scores: torch.Tensor, target: torch.Tensor) -> int | None:
    """The class axis of 3-dim ``scores`` that per-position labels say: 1 when ``target``
    is ``scores`` without axis 1 (a Conv1d's per-frame ``(N, C, T)`` scores against
    ``(N, T)`` labels) and not without the last axis; None (the default rule of
    :func:`classes_last`) otherwise, the ambiguous ``C == T`` included."""
    if scores.dim() != 3 or target.dim() != 2:
        return None
    shape = tuple(target.shape)
    first = shape == (scores.shape[0], scores.shape[2])
    last = shape == tuple(scores.shape[:2])
    return 1 if first and not last else None


def cross_entropy(outputs: Any, target: Any, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the first output against class-index targets; binary cross-entropy
    when it holds one score per sample (on probabilities when every score of the batch lies
    in [0, 1], as :func:`decision_threshold` reads them, else on logits)."""
    if target is None:
        raise TaskError(
            "cross-entropy needs labels, but the training batches carry none (target None): "
            "distil from the uncompressed model instead (a recipe's prune or lowrank stage: "
            "`kd: true`; Python: loss_fn=edgeslim.distill.kd_loss(teacher)), or give data "
            "with labels"
        )
    if not isinstance(target, torch.Tensor):
        raise TaskError(
            "the default training loss is cross-entropy of the first output against one "
            "class index per sample, but the training batches' target is a "
            f"{type(target).__name__}, not a tensor: a model "
            "with several heads or targets that are values needs its own loss, "
            "`Task(loss=fn)` with `fn(outputs, target) -> tensor` (docs/task.md)"
        )
    single = one_score(outputs)
    if single is not None:  # one score per sample: binary cross-entropy
        scores, labels = single.reshape(-1), target.reshape(-1).to(single.dtype)
        labels = labels * (1 - label_smoothing) + 0.5 * label_smoothing
        if decision_threshold(scores.detach()) == 0.5:  # probabilities (a final sigmoid)
            return nn.functional.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), labels)
        return nn.functional.binary_cross_entropy_with_logits(scores, labels)
    axis = labels_class_axis(first_output(outputs), target)
    logits = class_logits(outputs, axis)
    if logits.shape[0] != target.numel():
        raise TaskError(
            f"the training labels {list(target.shape)} do not fit the first output "
            f"{list(first_output(outputs).shape)}: cross-entropy takes one class index per "
            f"row of class scores ({logits.shape[0]} rows of {logits.shape[-1]} classes "
            "here; the classes are the last axis, axis 1 of a map of 4 or more dims). An "
            "output of values (a depth map, a regression) needs its own loss, "
            "`Task(loss=fn)` with `fn(outputs, target) -> tensor`, or train without labels "
            "by distilling from the uncompressed model (`kd: true` in the stage)"
        )
    return nn.functional.cross_entropy(logits, target.reshape(-1), label_smoothing=label_smoothing)


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """The default training loss: :func:`cross_entropy` on the first output."""

    def loss(outputs: Any, target: Any, inputs: Inputs) -> torch.Tensor:
        return cross_entropy(outputs, target, label_smoothing)

    return loss


def _as_batches(data: Iterable[Any] | Split, batch_size: int) -> Iterable[Any]:
    """A :class:`Split` as in-order batches; anything else as it is."""
    if isinstance(data, Split):
        return TensorBatches(data.images, data.labels, batch_size)
    return data


def one_score(outputs: Any) -> torch.Tensor | None:
    """A binary classifier's scores, one per sample (per pixel for a ``(N, 1, H, W)`` map),
    shaped like its labels; None when the first output holds several classes. The one rule
    for top-1, the default loss and (on rows) agreement and KD."""
    out = classes_last(first_output(outputs))
    if out.dim() == 1:
        return out
    return out[..., 0] if out.shape[-1] == 1 else None


def decision_threshold(scores: torch.Tensor) -> float:
    """Where a binary classifier's single score decides: 0.5 when every score lies in
    [0, 1] (probabilities), else 0 (logits)."""
    return 0.5 if bool(((scores >= 0) & (scores <= 1)).all()) else 0.0


def top1_predictions(outputs: Any) -> torch.Tensor:
    """What :func:`top1_hits` compares with the targets: the argmax of the first output over
    its classes, or with one score per sample the decision."""
    single = one_score(outputs)
    if single is not None:  # a binary decision
        return (single > decision_threshold(single)).long()
    return classes_last(first_output(outputs)).argmax(-1)


def top1_hits(outputs: Any, target: torch.Tensor) -> int:
    """How many argmaxes of the first output over its classes (:func:`classes_last`) equal
    ``target``; with one score per sample, how many decisions (:func:`decision_threshold`)
    do. A segmentation output ``(N, C, H, W)`` against ``(N, H, W)`` labels: pixel accuracy.

    Per-frame scores ``(N, C, T)`` against ``(N, T)`` labels are read per frame
    (:func:`labels_class_axis`). Refuses a target of another shape: ``(N,)`` predictions
    against a ``(N, 1)`` column broadcast to ``(N, N)`` and counted nonsense."""
    axis = labels_class_axis(first_output(outputs), target)
    pred = top1_predictions(outputs) if axis is None else first_output(outputs).argmax(axis)
    if pred.shape != target.shape:
        raise ValueError(
            f"top-1 compares the argmax of the model's output over its classes, shape "
            f"{list(pred.shape)}, with the targets, shape {list(target.shape)}: give one "
            "class index per prediction (a (N, 1) column or one-hot rows need reshaping)"
        )
    return int((pred == target).sum())


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Batch] | Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of the first output (:func:`top1_hits`: the argmax over its
    classes, or a binary decision) on ``(inputs, target)`` batches; restores the model's
    train/eval mode afterwards.

    A :class:`Split` is accepted for convenience (batched by ``batch_size``).
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    for item in _as_batches(data, batch_size):
        inputs, target = as_batch(item)
        correct += top1_hits(model(*inputs), target)
        total += int(target.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _refuse_one_shot(data: Iterable[Any], name: str) -> None:
    if is_one_shot(data):
        raise ValueError(
            f"{name} is a one-shot iterator (a generator?): it would be empty after the first "
            "pass. Pass a re-iterable source: a list of batches, a DataLoader or a "
            "edgeslim.data.batching.TensorBatches."
        )


def steps_per_epoch(data: Iterable[Any]) -> int:
    """``len(data)`` when it has one (a list, a DataLoader, TensorBatches), else the batches
    counted by one pass over ``data`` (which then costs an extra epoch of loading)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


def _channels_last(inputs: Inputs) -> Inputs:
    """4-D (image) inputs in channels_last memory format; other inputs unchanged."""
    return tuple(
        t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs
    )


def channels_last_hazard(model: nn.Module) -> str | None:
    """The first layer whose backward pass crashes the process in channels_last, or None.

    torch 2.13's CPU backward of a 1x1 conv with stride > 1 reading fewer than 16 channels
    in channels_last corrupts the heap for some batch and map sizes (measured: 6-15 input
    channels, batch 13, 16x16 maps abort; contiguous tensors never do). Such convs are
    common after pruning (a ResNet/RegNet shortcut cut to 9 channels), so training runs in
    the contiguous format when the model has one."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
            one_by_one = tuple(m.weight.shape[2:]) == (1, 1)
            reads = m.weight.shape[1] * m.groups
            if one_by_one and max(_pair(m.stride)) > 1 and reads < 16:
                return name
    return None


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def train_classifier(
    model: nn.Module,
    train: Iterable[Batch],
    config: TrainConfig,
    val: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    description: str = "train",
    on_step: Callable[[float], None] | None = None,
    no_decay: Callable[[str], bool] | None = None,
    keep_best: bool = False,
    val_name: str = "val_top1",
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``(inputs, target)`` batches; returns one ``{epoch, loss,
    val_top1}`` dict per epoch. ``val_name``: what the log calls the ``val`` score
    (``val_agreement`` when ``val``'s labels are a teacher's top-1).

    ``train`` is iterated once per epoch, so it must be re-iterable (a one-shot generator
    is refused with a ValueError). Steps per epoch, which size the OneCycle schedule, are
    ``len(train)`` or, without a length, counted by one extra pass. The model is called as
    ``model(*inputs)``. ``loss_fn(outputs, target, inputs)`` replaces cross-entropy on the
    first output (with ``config.label_smoothing``) when given, e.g. for distillation, where
    ``target`` may be None. ``val`` batches are scored with :func:`evaluate` after each
    epoch. ``on_step(progress)`` is called before every step with the fraction of training
    done (QAT uses it to sharpen AQE/tanh estimators and advance the n-BQ blend).
    ``no_decay(name)`` True exempts that parameter from weight decay (QAT: learned
    quantizer scales, which decay would shrink toward zero).

    ``keep_best`` (needs ``val``): the model is scored on ``val`` before training too, and
    ends with the weights of the best score, the untrained ones included (ties go to the
    earlier epoch); the last row says which (``best_epoch``, 0 for none, and
    ``val_top1_start``). ``val`` must then be data the loop does not train on: a model that
    starts good (a pruned model refitted by least squares) can lose to a fine-tune that
    overfits a few hundred inputs, and only held-out inputs show it.
    """
    _refuse_one_shot(train, "train")
    if val is not None:
        _refuse_one_shot(val, "val")
    elif keep_best:
        raise ValueError("keep_best needs val: held-out batches to choose the epoch on")
    per_epoch = steps_per_epoch(train)
    if per_epoch == 0:
        raise ValueError("train has no batches")
    loss_fn = loss_fn if loss_fn is not None else classification_loss(config.label_smoothing)
    torch.manual_seed(config.seed)
    # a 5-D weight (Conv3d) has no channels_last format: ``to`` raises on it
    flat = any(p.dim() > 4 for p in model.parameters())
    channels_last = config.channels_last and not flat and channels_last_hazard(model) is None
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params: Any = model.parameters()
    if no_decay is not None:
        named = list(model.named_parameters())
        params = [
            {"params": [p for n, p in named if not no_decay(n)]},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
    opt = torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    total_steps = config.epochs * per_epoch
    sched: torch.optim.lr_scheduler.LRScheduler
    if total_steps >= 8:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=total_steps, pct_start=0.25
        )
    else:  # too few steps for a warm-up and an anneal: keep the learning rate constant
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    history: list[dict[str, float]] = []
    best: _Best | None = _Best.of(model, val) if keep_best and val is not None else None
    model.train()
    step = 0
    constrained: list[Any] | None = None
    with progress_bar() as bar:
        task = bar.add_task(description, total=total_steps)
        for epoch in range(config.epochs):
            total, seen = 0.0, 0
            for item in train:
                inputs, target = as_batch(item)
                if on_step is not None:
                    on_step(min(step / max(total_steps - 1, 1), 1.0))
                step += 1
                if channels_last:
                    try:
                        outputs = model(*_channels_last(inputs))
                        inputs = _channels_last(inputs)
                    except RuntimeError as exc:
                        if "view size is not compatible" not in str(exc):
                            raise
                        # the model reshapes with .view(), which needs contiguous NCHW
                        # tensors (`x.view(x.size(0), -1)` after a conv): train it as it is
                        channels_last = False
                        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
                        outputs = model(*inputs)
                else:
                    outputs = model(*inputs)
                loss = loss_fn(outputs, target, inputs)
                if not loss.requires_grad:
                    raise TaskError(
                        f"{type(model).__name__} cannot be trained here: its output carries no "
                        "gradient (a forward decorated with @torch.no_grad or "
                        "@torch.inference_mode, outputs .detach()ed, or every parameter frozen "
                        "with requires_grad=False). Remove that for "
                        "training, or use stages that do not train (finetune_epochs: 0, PTQ, "
                        "data-free)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if constrained is None:  # after the first forward: LSQ makes ranges learnable
                    constrained = _constrained(model)
                    for module in constrained:
                        module.hold_range(start=True)
                opt.step()
                for module in constrained:
                    module.hold_range()
                if step <= total_steps:  # an iterable may yield more batches than counted
                    sched.step()
                n = batch_size_of(inputs)
                total += float(loss.detach()) * n
                seen += n
                bar.update(task, advance=1, description=f"{description} ep{epoch + 1}")
            row = {"epoch": float(epoch + 1), "loss": total / max(seen, 1)}
            if val is not None:
                row["val_top1"] = evaluate(model, val)
                if best is not None:
                    best.offer(model, row["val_top1"], epoch + 1)
            history.append(row)
            shown = {val_name if k == "val_top1" else k: v for k, v in row.items()}
            bar.console.log(", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if best is not None:
            best.restore(model)
            if history:
                history[-1].update(best_epoch=float(best.epoch), val_top1_start=best.start)
            if best.epoch < config.epochs:
                bar.console.log(
                    f"{description}: kept epoch {best.epoch} ({val_name} {best.score:.4g})"
                )
    if channels_last:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return history


@dataclass
class _Best:
    """The best-scoring weights seen so far (``keep_best``), as a detached copy."""

    score: float
    epoch: int
    start: float
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, val: Iterable[Batch]) -> _Best:
        score = evaluate(model, val)
        return cls(score, 0, score, _copy_state(model))

    def offer(self, model: nn.Module, score: float, epoch: int) -> None:
        if score > self.score:
            self.score, self.epoch, self.state = score, epoch, _copy_state(model)

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _constrained(model: nn.Module) -> list[Any]:
    """The modules with a constraint to restore after each optimizer step: quantizers whose
    step is learned (LSQ, PACT) stay positive (``hold_range``)."""
    from edgeslim.quant.quantizers import RangeQuantizer

    return [
        m for m in model.modules()
        if isinstance(m, RangeQuantizer) and m.homogeneous
        and isinstance(m.range_param, nn.Parameter)
    ]  # fmt: skip
