"""Peer tools measured beside edgeslim on the same model and data: ONNX Runtime's static
quantization and torch's FX int8 path. Each is configured the way its documentation
recommends for CPU int8 (QDQ, per-channel int8 weights, uint8 activations; x86 backend)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def ort_quantize_static(fp32_onnx: Path, out: Path, calib: torch.Tensor, input_name: str) -> Path:
    """``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, U8S8, MinMax)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                [{input_name: calib[i : i + 64].numpy()} for i in range(0, len(calib), 64)]
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


def torch_fx_int8(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """torch.ao FX graph-mode static int8 (x86 backend), calibrated on ``calib``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    m = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (calib[:1],))
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                prepared(calib[i : i + 64])
        converted = convert_fx(prepared)
    return converted
