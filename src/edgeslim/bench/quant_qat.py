"""QAT rows of the ``quant`` suite: W4A4, and W2A2 / W1A1 with the STE vs the AQE estimator.

Every row starts from the same PTQ-calibrated model and gets the same short fine-tune with
KD from the fp32 model, so the rows differ only in bits and estimator. Decisions:

- The first and the last layer stay at W8A8 (the usual practice: the input conv sees raw
  pixels and the classifier sets the logits; both are a small share of the MACs).
- ``estimator = aqe`` applies AQE to the *weights*; activations use the STE in every row.
  AQE on activations collapsed in a short fine-tune (see ``docs/quantization.md``) and
  costs 12x the time, so the comparison isolates the weight estimator.
- 1-bit weights are the ``binary`` quantizer (scaled sign per channel); 1-bit
  activations are the uniform ``{0, s}`` grid (after ReLU). 2-bit weights are the
  symmetric uniform grid ``{-s, 0, s}``.
- Top-1 is measured in torch (fake-quant): ONNX Runtime has no kernel below int8, so a
  latency would only be int8's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Batch, TensorBatches
from edgeslim.quant import QuantConfig, QuantSpec
from edgeslim.quant.config import Selection
from edgeslim.train.loop import TrainConfig, evaluate


@dataclass(frozen=True)
class QatVariant:
    key: str
    w_bits: int
    a_bits: int
    estimator: str  # of the weights

    def config(self) -> QuantConfig:
        quantizer = "binary" if self.w_bits == 1 else "uniform"
        weight = QuantSpec(
            quantizer=quantizer, bits=self.w_bits, estimator=self.estimator, observer="mse"
        )
        act = QuantSpec(bits=self.a_bits, granularity="tensor", symmetric=False, estimator=ACT_EST,
                        observer="percentile")  # fmt: skip
        return QuantConfig(weight, act)


ACT_EST = "lsq"

VARIANTS = (
    QatVariant("qat_w4a4", 4, 4, "ste"),
    QatVariant("qat_w2a2_ste", 2, 2, "ste"),
    QatVariant("qat_w2a2_aqe", 2, 2, "aqe"),
    QatVariant("qat_w1a1_ste", 1, 1, "ste"),
    QatVariant("qat_w1a1_aqe", 1, 1, "aqe"),
)


def edge_layers(model: nn.Module) -> list[str]:
    """FQNs of the first and last conv/linear (kept at W8A8)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]] if names else []


def qat_variant(
    fp32: nn.Module,
    variant: QatVariant,
    calib: torch.Tensor,
    train: TensorBatches,
    test: Iterable[Batch],
    config: TrainConfig,
) -> dict[str, Any]:
    """PTQ -> QAT (KD from ``fp32``) of one variant; returns top-1 before and after.

    ``train`` is consumed by this run (its shuffling goes on where it stopped), so give each
    variant fresh batches for them to see the same ones."""
    from edgeslim.quant import w8a8
    from edgeslim.quant.ptq import ptq
    from edgeslim.quant.qat import qat_train

    select: Selection = dict.fromkeys(edge_layers(fp32), w8a8())
    t0 = time.perf_counter()
    model = ptq(copy.deepcopy(fp32), variant.config(), calib, select=select)
    ptq_top1 = evaluate(model, test)
    qat_train(model, train, config, teacher=fp32)
    return {
        "module": model,
        "top1": evaluate(model, test),
        "seconds": time.perf_counter() - t0,
        "extra": {
            "ptq_top1": round(ptq_top1, 4),
            "weight_estimator": variant.estimator,
            "activation_estimator": "ste",
            "weight_quantizer": variant.config().weight.quantizer,  # type: ignore[union-attr]
            "w8a8_layers": sorted(select),
            "qat_images": train.num_samples,
            "qat_epochs": config.epochs,
            "qat_lr": config.lr,
            "kd": True,
        },
    }
