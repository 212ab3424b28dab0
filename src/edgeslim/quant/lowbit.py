"""Low-bit QAT recipe (W4A4 down to W1A1, ternary): the practice that makes 1-2 bits work.

A short fake-quant fine-tune alone loses most of a 1-bit model's accuracy; what the field
does, and this recipe does, is: start from the trained fp32 weights; learn the step sizes
(LSQ by default; AQE, tanh or plain STE selectable for the weights); keep the first conv
and the last linear at 8 bits; distil from the fp32 model (``edgeslim.distill``); keep
weight decay off the learned scales; optionally descend the bits in stages (8 -> 4 -> 2 ->
1), each stage starting from the previous one's latent weights; re-estimate BatchNorm
statistics on the final quantized weights, kept only if the validation split prefers them.

Decision — between progressive stages the float latent model's BatchNorm statistics are
re-estimated before the next stage calibrates its activation ranges: the statistics
carried over were gathered on the previous stage's quantized forward, and calibrating the
float forward with them put resnet20's 1-bit activation steps about 5x too wide (W2A2 ->
W1A1, one epoch each, 2,500 images: ``layer1.0.conv1``'s input step 5.0 against 0.92 with
the re-estimation; the W1A1 stage started at 11.8% and ended at chance, 10.0%; with the
re-estimation it started at 14.4% and ended at 68.95%).

Binary weights are the XNOR-Net scaled sign (``binary``: ``±α`` with one α per output
channel, learned by LSQ); ternary weights are ``{-α, 0, α}`` per channel whose threshold
``α/2`` moves with the learned α (LSQ on the ``ternary`` quantizer: the threshold is learned
through the step). BatchNorm is not folded during QAT, so the real-valued residual adds of
the model (resnet20's block shortcuts) stay real-valued, as in Bi-Real Net.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Batch, Inputs, as_batch
from edgeslim.distill import DistillConfig, DistillLoss, config_to_dict
from edgeslim.quant.api import calibrate, quantize_, set_progress
from edgeslim.quant.config import QuantConfig, Selection
from edgeslim.quant.spec import QuantConfigError, QuantSpec
from edgeslim.train.batchnorm import reestimate_bn
from edgeslim.train.loop import TrainConfig, evaluate, train_classifier


@dataclass(frozen=True)
class LowBitRecipe:
    """One low-bit QAT run.

    ``weight_quantizer``: ``auto`` (binary at 1 bit, uniform otherwise) or any registered
    quantizer name (``ternary`` with ``w_bits=2``). ``estimator`` / ``act_estimator``: the
    gradient estimators of weights and activations (``lsq`` learns their scales).
    ``edge_bits``: bits of the first conv and last linear (None: quantize them like the
    rest). ``distill``: losses from the fp32 teacher (empty: cross-entropy only).
    ``progressive``: bit-widths trained first, ``stage_epochs`` each, before ``epochs`` at
    the target (e.g. ``(8, 4, 2)`` before W1A1). ``bn_reestimate``: recompute BatchNorm
    statistics after training on ``bn_batches`` training batches.
    """

    w_bits: int = 2
    a_bits: int = 2
    weight_quantizer: str = "auto"
    estimator: str = "lsq"
    act_estimator: str = "lsq"
    edge_bits: int | None = 8
    distill: tuple[DistillConfig, ...] = ()
    progressive: tuple[int, ...] = ()
    epochs: int = 1
    stage_epochs: int = 1
    lr: float = 0.01
    weight_decay: float = 5e-5
    scale_weight_decay: bool = False
    bn_reestimate: bool = True
    bn_batches: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if any(b < max(self.w_bits, self.a_bits) for b in self.progressive):
            raise QuantConfigError(
                f"progressive stages must not go below the target bits "
                f"(W{self.w_bits}A{self.a_bits}); got {list(self.progressive)}"
            )
        if self.epochs < 1 or self.stage_epochs < 1:
            raise QuantConfigError("epochs and stage_epochs must be >= 1")
        self.stage_config(self.w_bits, self.a_bits)  # validates quantizer/bits/estimators

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.stage_epochs * len(self.progressive)

    def stage_config(self, w_bits: int, a_bits: int) -> QuantConfig:
        """The quantization of the inner layers at one stage's bits."""
        quantizer = self.weight_quantizer
        if quantizer == "auto" or w_bits != self.w_bits:  # earlier stages: uniform grid
            quantizer = "binary" if w_bits == 1 else "uniform"
        observer = "mse" if quantizer == "uniform" else "minmax"
        weight = QuantSpec(quantizer=quantizer, bits=w_bits, estimator=self.estimator,
                           observer=observer)  # fmt: skip
        act_observer = "mse_wide" if a_bits == 1 else "percentile"  # see observers' doc
        act = QuantSpec(bits=a_bits, granularity="tensor", symmetric=False,
                        estimator=self.act_estimator, observer=act_observer)  # fmt: skip
        return QuantConfig(weight, act)

    def to_dict(self) -> dict[str, Any]:
        """The record's ``config``: every choice, the distillation losses as data."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "distill"}
        d["progressive"] = list(self.progressive)
        d["distill"] = [config_to_dict(c) for c in self.distill]
        d["total_epochs"] = self.total_epochs
        return d


@dataclass
class LowBitResult:
    """The trained quantized model, per-stage history and what the run decided."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    bn_reestimated: bool = False
    val_before_bn: float | None = None
    val_after_bn: float | None = None
    edge_layers: list[str] = field(default_factory=list)


def edge_layers(model: nn.Module) -> list[str]:
    """FQNs of the first and the last conv/linear: kept at 8 bits by common practice (the
    input conv sees raw pixels, the classifier sets the logits; both are few MACs)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]] if names else []


def edge_config(bits: int) -> QuantConfig:
    """W``bits``A``bits`` for the edge layers (LSQ scales, asymmetric activations)."""
    return QuantConfig(
        QuantSpec(bits=bits, estimator="lsq", observer="mse"),
        QuantSpec(bits=bits, granularity="tensor", symmetric=False, estimator="lsq",
                  observer="percentile"),
    )  # fmt: skip


def is_quantizer_param(name: str) -> bool:
    """Learned quantizer ranges (step sizes, clips, α): no weight decay for them."""
    return "quantizer" in name or "input_quant" in name


def float_weights(quantized: nn.Module, like: nn.Module) -> dict[str, torch.Tensor]:
    """The latent float state of a fake-quant model, keyed for its float architecture
    (the quant layers keep the float layers' parameter names)."""
    keys = set(like.state_dict())
    return {k: v.detach().clone() for k, v in quantized.state_dict().items() if k in keys}


def _inputs(train: Iterable[Batch]) -> Iterator[Inputs]:
    """The inputs of each training batch (no label: BatchNorm re-estimation)."""
    return (as_batch(b)[0] for b in train)


def _stages(recipe: LowBitRecipe) -> list[tuple[int, int, int]]:
    """``(w_bits, a_bits, epochs)`` per stage, the target last."""
    early = [(max(b, recipe.w_bits), max(b, recipe.a_bits), recipe.stage_epochs)
             for b in recipe.progressive]  # fmt: skip
    return [*early, (recipe.w_bits, recipe.a_bits, recipe.epochs)]


def lowbit_qat(
    fp32: nn.Module,
    recipe: LowBitRecipe,
    train: Iterable[Batch],
    calibration: Sequence[Inputs],
    val: Iterable[Batch] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> LowBitResult:
    """Quantize a copy of ``fp32`` by ``recipe`` and train it on ``train`` batches; ``fp32``
    is the teacher and is left untouched.

    ``calibration``: input tuples for the initial activation ranges of each stage. ``val``
    decides whether the BatchNorm re-estimation is kept. ``example_inputs`` are needed by
    distillation losses with taps (feature, DCCD). The model returned is in eval mode with
    every estimator at progress 1 (the hard quantizer).
    """
    t0 = time.perf_counter()
    teacher = copy.deepcopy(fp32).eval()
    edges = edge_layers(fp32) if recipe.edge_bits is not None else []
    select: Selection = {n: edge_config(recipe.edge_bits or 8) for n in edges}
    latent = copy.deepcopy(fp32)
    history: list[dict[str, float]] = []
    model: nn.Module = latent
    for i, (w_bits, a_bits, epochs) in enumerate(_stages(recipe)):
        if i:  # the latent BN statistics describe the previous stage's quantized forward
            reestimate_bn(latent, _inputs(train), recipe.bn_batches)
        model = copy.deepcopy(latent)
        quantize_(model, recipe.stage_config(w_bits, a_bits), select=select)
        # ranges are calibrated on the model as its training starts: its schedule at 0
        set_progress(model, 0.0)
        calibrate(model, calibration, progress=False)
        config = TrainConfig(epochs=epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                             seed=recipe.seed + i, channels_last=False)  # fmt: skip
        no_decay = None if recipe.scale_weight_decay else is_quantizer_param
        loss: DistillLoss | None = None
        trained: nn.Module = model
        if recipe.distill:
            loss = DistillLoss(teacher, model, recipe.distill, example_inputs)
            trained = loss.trainable_student()
        try:
            rows = train_classifier(
                trained, train, config, loss_fn=loss, description=f"qat W{w_bits}A{a_bits}",
                on_step=functools.partial(set_progress, model), no_decay=no_decay,
            )  # fmt: skip
        finally:
            if loss is not None:
                loss.close()
        set_progress(model, 1.0)
        history += [{**r, "w_bits": float(w_bits), "a_bits": float(a_bits)} for r in rows]
        latent.load_state_dict(float_weights(model, latent))
    result = LowBitResult(model=model, history=history, edge_layers=edges)
    if recipe.bn_reestimate:
        result.val_before_bn = evaluate(model, val) if val is not None else None
        saved = copy.deepcopy(model.state_dict())
        reestimate_bn(model, _inputs(train), recipe.bn_batches)
        result.val_after_bn = evaluate(model, val) if val is not None else None
        before, after = result.val_before_bn, result.val_after_bn
        keep = before is None or after is None or after >= before
        if not keep:
            model.load_state_dict(saved)
        result.bn_reestimated = keep
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
