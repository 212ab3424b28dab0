"""Post-training quantization in one call: fold BN, quantize layers, edge quantizers, calibrate."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Inputs, input_batches
from edgeslim.errors import TraceError
from edgeslim.quant.api import calibrate, quantize_
from edgeslim.quant.config import QuantConfig, Selection
from edgeslim.quant.fold import fold_batchnorm


def ptq(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any] | torch.Tensor | None,
    select: Selection | None = None,
    batch_size: int = 64,
    bias_correction: bool = False,
) -> nn.Module:
    """A quantized copy of ``model``: the deployable PTQ pipeline.

    BatchNorm is folded, every selected conv/linear quantized, activation quantizers moved
    onto graph edges (so ONNX Runtime can run integer kernels end to end) and calibrated on
    ``calibration``. Models that do not trace keep per-layer input quantizers (with a
    warning). Weight-only configs need no calibration data. ``bias_correction`` then
    removes the mean output shift that weight rounding causes, measured on the same
    calibration batches.

    ``calibration`` is an iterable of input batches (a tensor or a tuple of tensors, one per
    model input; ``(inputs, target)`` pairs work too, the target is ignored), or a single
    tensor of samples, split into batches of ``batch_size``.
    """
    if config.activation is None or calibration is None:
        return prepare_ptq(model, config, select)
    out = ptq_structure(model, config, select)
    batches = calibration_batches(calibration, batch_size)
    calibrate(out, batches, progress=False)
    if bias_correction:
        from edgeslim.quant.bias_correction import correct_bias

        correct_bias(out, batches)
    return out


def prepare_ptq(model: nn.Module, config: QuantConfig, select: Selection | None) -> nn.Module:
    """A copy of ``model`` with BatchNorm folded and every selected layer quantized; no edge
    quantizer yet. PTQ and the rebuild of a saved quantize stage share it."""
    m = copy.deepcopy(model).eval()
    with contextlib.suppress(TraceError):  # untraceable: BN stays, layers still quantized
        fold_batchnorm(m)
    quantize_(m, config, select=select)
    return m


def ptq_structure(
    model: nn.Module, config: QuantConfig, select: Selection | None, edges: bool = True
) -> nn.Module:
    """What :func:`ptq` calibrates: :func:`prepare_ptq`, then (with ``edges`` and quantized
    activations) the activation quantizers moved onto the graph's edges. Uncalibrated: PTQ
    calibrates it, a reload loads the calibrated ranges into it."""
    from edgeslim.quant.edges import quantize_edges

    m = prepare_ptq(model, config, select)
    if not edges or config.activation is None:
        return m
    try:
        return quantize_edges(m)
    except TraceError as exc:
        # the model still quantizes, each layer's input on its own grid; said, because
        # ONNX Runtime then fuses few layers (SqueezeBERT ran 1% of its MACs on integers)
        warnings.warn(
            f"activation quantizers stay on the layers' inputs: {exc} Without them on the "
            "graph's edges, ONNX Runtime runs most layers in float; the export's coverage "
            "says how many.",
            stacklevel=3,
        )
        return m


def calibration_batches(calibration: Iterable[Any] | torch.Tensor, batch_size: int) -> list[Inputs]:
    """Input tuples from calibration data: a tensor of samples is cut into ``batch_size``
    batches; an iterable is read once, so calibration and bias correction see the same."""
    if isinstance(calibration, torch.Tensor):
        return [(calibration[i : i + batch_size],) for i in range(0, len(calibration), batch_size)]
    return list(input_batches(calibration))


def ptq_transformer(
    model: nn.Module,
    config: QuantConfig,
    calibration: list[dict[str, torch.Tensor]] | None = None,
    alpha: float | None = 0.6,
    select: Selection | None = None,
) -> nn.Module:
    """A quantized copy of a Hugging Face encoder: every ``nn.Linear`` quantized.

    With activation quantization and ``calibration`` token batches, SmoothQuant with
    ``alpha`` first moves activation outliers into the weights (``alpha=None`` skips it).
    Dynamic activations need no range calibration; the batches only size the smoothing.
    """
    from edgeslim.quant.smooth import smooth_

    m = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # embeddings have no quantized twin: expected, not news
        warnings.filterwarnings("ignore", "quantize_: layer types without")
        quantize_(m, config, select=select)
    if config.activation is not None and alpha is not None:
        if not calibration:
            raise ValueError("SmoothQuant needs calibration batches (or pass alpha=None)")
        smooth_(m, calibration, alpha)
    return m
