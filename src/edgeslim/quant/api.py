"""The quantization lifecycle: ``quantize_`` (prepare) -> ``calibrate`` / train -> ``convert``.

``quantize_(model, config, select=...)`` swaps every selected ``Conv2d``/``Linear`` for its
fake-quant twin in place. Weights are calibrated at once (they are known); activation
ranges need :func:`calibrate` (PTQ) or observation before QAT.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import as_inputs
from edgeslim.quant.config import QuantConfig, Selection, check_selectors, resolve
from edgeslim.quant.fold import _set_submodule
from edgeslim.quant.modules import FLOAT_TO_QUANT, ActQuant, QuantMixin
from edgeslim.quant.spec import QuantConfigError

COMPUTE_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding)


def _no_fused_encoder_path(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoderLayer`` off its fused inference kernel when it holds
    quantized layers: under ``no_grad`` in eval mode that kernel reads ``linear1``/``linear2``
    weights directly and never calls their ``forward``, so the fake-quant layers would be
    skipped (never calibrated, and measured as float). The flag only chooses the path."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
            isinstance(c, QuantMixin) for c in m.modules()
        ):
            m.activation_relu_or_gelu = 0


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    select: Selection | None = None,
) -> dict[str, QuantConfig]:
    """Prepare ``model`` in place for fake-quant; returns ``{fqn: config}`` of what changed.

    ``config`` is the default for every Conv2d/Linear; ``select`` overrides it per layer
    (see :mod:`edgeslim.quant.config`). Layers of other compute types are skipped with a
    warning that lists them; NaN/Inf weights are refused with the layer's name.
    """
    config = config if config is not None else QuantConfig()
    names = [n for n, _ in model.named_modules()]
    for key in check_selectors(select, names):
        warnings.warn(f"quantize_: selector {key!r} matches no layer", stacklevel=2)
    chosen: dict[str, QuantConfig] = {}
    skipped: list[str] = []
    for fqn, module in list(model.named_modules()):
        if isinstance(module, QuantMixin) or not fqn:
            continue
        cfg = resolve(fqn, module, select, config)
        cls = FLOAT_TO_QUANT.get(type(module))
        if cls is None:
            if isinstance(module, COMPUTE_TYPES) and cfg is not None:
                skipped.append(f"{fqn} ({type(module).__name__})")
            continue
        if cfg is None or (cfg.weight is None and cfg.activation is None):
            continue
        weight = module.weight
        if not torch.isfinite(weight).all():
            raise QuantConfigError(
                f"layer {fqn} ({type(module).__name__}) has NaN or Inf weights; fix or "
                "retrain the model before quantizing (nothing was changed after this layer)"
            )
        chosen[fqn] = cfg
    for fqn, cfg in chosen.items():
        module = model.get_submodule(fqn)
        _set_submodule(model, fqn, FLOAT_TO_QUANT[type(module)].from_float(module, cfg))
    _no_fused_encoder_path(model)
    if skipped:
        warnings.warn(
            "quantize_: layer types without a quantized implementation were left in float: "
            + ", ".join(skipped),
            stacklevel=2,
        )
    return chosen


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], progress: bool = True) -> int:
    """PTQ: observe input activations on input ``batches`` (each a tensor or a tuple of
    tensors, one per model input; see :mod:`edgeslim.data.batching`), set their ranges.

    Returns the number of batches seen. The model runs in eval mode without gradients.
    """
    from edgeslim.progress import progress_bar

    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    for a in acts:
        a.mode = "observe"
    was_training = model.training
    model.eval()
    n = 0
    items = list(batches)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("calibrate", total=len(items)) if progress else None
        for batch in items:
            model(*as_inputs(batch))
            n += 1
            if task is not None:
                bar.advance(task)
    for a in acts:
        a.finish_observing()
    model.train(was_training)
    return n


def set_progress(model: nn.Module, p: float) -> None:
    """Tell every estimator how far training is (0..1): drives AQE/tanh/n-BQ schedules."""
    for m in model.modules():
        est = m.estimator if isinstance(m, ActQuant) else getattr(m, "w_estimator", None)
        if est is not None and isinstance(m, (ActQuant, QuantMixin)):
            est.set_progress(p)
