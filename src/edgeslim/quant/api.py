"""The quantization lifecycle: ``quantize_`` (prepare) -> ``calibrate`` / train -> ``convert``.

``quantize_(model, config, select=...)`` swaps every selected layer that has a fake-quant twin
(Conv1d/2d/3d, ConvTranspose1d/2d, Linear, LSTM/GRU/RNN and their cells: see :data:`TWINS`)
in place. Weights are calibrated at once (they are known); activation
ranges need :func:`calibrate` (PTQ) or observation before QAT.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgeslim.data.batching import as_inputs
from edgeslim.graph.attention import SplitMultiheadAttention, unfuse_encoder_layers
from edgeslim.graph.swap import replace_submodule, retie, tied_parameters
from edgeslim.quant.attention import QuantMultiheadAttention, QuantSplitAttention
from edgeslim.quant.config import QuantConfig, Selection, check_selectors, resolve
from edgeslim.quant.modules import FLOAT_TO_QUANT, ActQuant, QuantMixin
from edgeslim.quant.recurrent import RECURRENT_TO_QUANT, QuantRNN
from edgeslim.quant.spec import QuantConfigError

COMPUTE_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
)
"""Layer types that carry weights worth quantizing: reported when they stay float."""

TWINS: dict[type[nn.Module], Any] = {
    **FLOAT_TO_QUANT,
    **RECURRENT_TO_QUANT,
    nn.MultiheadAttention: QuantMultiheadAttention,
    SplitMultiheadAttention: QuantSplitAttention,
}
"""Float layer type (exact) -> its fake-quant twin."""


def twin_of(module: nn.Module) -> Any | None:
    """The fake-quant twin of ``module``'s layer type (:data:`TWINS`), or None.

    A subclass that changes nothing its base computes (no ``forward`` or ``_conv_forward``
    of its own: Hugging Face's ``EfficientNetDepthwiseConv2d`` only sets ``__init__``
    arguments) takes its base's twin; it was left float for being of another type."""
    cls = type(module)
    if cls in TWINS:
        return TWINS[cls]
    if cls.__module__.startswith("edgeslim.") or parametrize.is_parametrized(module):
        return None
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention reads its weight directly
    base = next((b for b in cls.__mro__[1:] if b in TWINS), None)
    computes = ("forward", "_conv_forward")
    if base is None or any(getattr(cls, f, None) is not getattr(base, f, None) for f in computes):
        return None
    return TWINS[base]


def _no_twin_reason(module: nn.Module, selected: bool = False) -> str | None:
    """Why a selected compute layer stays float (None: it has a twin and can be swapped)."""
    cls = twin_of(module)
    if cls is None:
        name = type(module).__name__
        if isinstance(module, nn.Linear) and name == "NonDynamicallyQuantizableLinear":
            return "its nn.MultiheadAttention reads the weight directly, not through forward()"
        if parametrize.is_parametrized(module):
            return (
                f"{name}: its weight is reparametrized (weight_norm, spectral_norm); fix it "
                "first with edgeslim.graph.reparam.bake_reparametrizations(model) (compress "
                "and search do)"
            )
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return (
                f"{name} is a subclass with its own forward; if it only computes its weight "
                "(weight standardisation), edgeslim.graph.reparam.bake_reparametrizations "
                "makes it a plain layer (compress and search do)"
            )
        return f"no quantized implementation of {name}"
    why_not = getattr(cls, "why_not", None)
    if why_not is None:
        reason = None
    elif cls is QuantRNN:  # GRU/RNN stay float by default; a `select` entry forces them
        reason = why_not(module, selected=selected)
    else:
        reason = why_not(module)
    return str(reason) if reason else None


def _explicit(fqn: str, module: nn.Module, select: Selection | None) -> bool:
    """Whether a ``select`` entry (not the default config) chose a config for the layer."""
    return resolve(fqn, module, select, None) is not None


def left_in_float(
    model: nn.Module, config: QuantConfig | None = None, select: Selection | None = None
) -> dict[str, str]:
    """``{fqn: reason}`` of every compute layer that ``quantize_(model, config, select)``
    leaves in float (selected ``None``, nothing to quantize, or no quantized twin)."""
    config = config if config is not None else QuantConfig()
    out: dict[str, str] = {}
    inside: tuple[str, ...] = ()
    for fqn, module in model.named_modules():
        if not fqn or isinstance(module, QuantMixin) or fqn.startswith(inside):
            continue
        if not isinstance(module, COMPUTE_TYPES) and twin_of(module) is None:
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside = (*inside, fqn + ".")  # its out_proj is reported as part of it
        cfg = resolve(fqn, module, select, config)
        kind = type(module).__name__
        if cfg is None:
            out[fqn] = f"{kind}: selected None (kept float on purpose)"
        elif cfg.weight is None and cfg.activation is None:
            out[fqn] = f"{kind}: its config quantizes neither weight nor activation"
        else:
            reason = _no_twin_reason(module, _explicit(fqn, module, select))
            if reason is not None:
                out[fqn] = f"{kind}: {reason}"
    return out


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    select: Selection | None = None,
) -> dict[str, QuantConfig]:
    """Prepare ``model`` in place for fake-quant; returns ``{fqn: config}`` of what changed.

    ``config`` is the default for every layer with a twin (:data:`TWINS`); ``select``
    overrides it per layer (see :mod:`edgeslim.quant.config`). Selected compute layers with
    no twin stay float with a warning per layer that says why and how to silence it;
    NaN/Inf weights are refused with the layer's name.
    """
    config = config if config is not None else QuantConfig()
    names = [n for n, _ in model.named_modules()]
    for key in check_selectors(select, names):
        warnings.warn(f"quantize_: selector {key!r} matches no layer", stacklevel=2)
    chosen: dict[str, QuantConfig] = {}
    skipped: dict[str, str] = {}
    inside: tuple[str, ...] = ()  # FQN prefixes of swapped layers: their children go with them
    for fqn, module in list(model.named_modules()):
        if isinstance(module, QuantMixin) or not fqn or fqn.startswith(inside):
            continue
        cfg = resolve(fqn, module, select, config)
        if isinstance(module, nn.MultiheadAttention):
            inside = (*inside, fqn + ".")
        if cfg is None or (cfg.weight is None and cfg.activation is None):
            continue
        reason = _no_twin_reason(module, _explicit(fqn, module, select))
        if reason is not None:
            if isinstance(module, COMPUTE_TYPES):
                skipped[fqn] = f"{type(module).__name__}: {reason}"
            continue
        for name, weight in module.named_parameters():
            if name.startswith("weight") and not torch.isfinite(weight).all():
                raise QuantConfigError(
                    f"layer {fqn} ({type(module).__name__}) has NaN or Inf weights; fix or "
                    "retrain the model before quantizing (nothing was changed after this layer)"
                )
        chosen[fqn] = cfg
        inside = (*inside, fqn + ".")
    _check_activations_possible(model, config, select, chosen)
    ties = tied_parameters(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, cfg in chosen.items():
        module = model.get_submodule(fqn)
        twin = twin_of(module)
        assert twin is not None  # chosen only with a twin
        replace_submodule(model, fqn, twin.from_float(module, cfg))
    retie(model, ties, params)  # a head tied to its embedding stays tied (QAT trains one)
    unfuse_encoder_layers(model)
    for fqn, why in skipped.items():
        kind, _, reason = why.partition(": ")
        warnings.warn(
            "quantize_: layer types without a quantized implementation were left in float: "
            f"{fqn} ({kind}): {reason}. To keep it float on purpose and silence this, select "
            f"it with None (recipe: `select: {{{fqn}: null}}`; Python: `select={{{fqn!r}: None}}`)",
            stacklevel=2,
        )
    return chosen


def _check_activations_possible(
    model: nn.Module,
    config: QuantConfig,
    select: Selection | None,
    chosen: dict[str, QuantConfig],
) -> None:
    """Refuse, naming the float layers and why, a request for activation quantization that
    no layer can carry (PTQ would otherwise fail later with no hint of the cause)."""
    values = [config, *(select or {}).values()]
    requested = any(c is not None and c.activation is not None for c in values)
    carried = any(c.activation is not None for c in chosen.values())
    if not requested or carried or any(isinstance(m, ActQuant) for m in model.modules()):
        return
    floats = left_in_float(model, config, select)
    listed = "; ".join(f"{k} ({v})" for k, v in floats.items()) or "the model has no such layer"
    raise QuantConfigError(
        "activation quantization was requested but no layer could be quantized, so no "
        f"activation can be. Left in float: {listed}. Quantize at least one layer with a "
        f"twin ({', '.join(sorted(t.__name__ for t in TWINS))}), or use a weight-only "
        "config (activation=None; recipe: `a_bits: null`)."
    )


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
