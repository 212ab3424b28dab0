"""Quantization: quantizers x gradient estimators, PTQ calibration, fake-quant layers."""

from edgeslim.quant.api import calibrate, quant_layers, quantize_, set_progress
from edgeslim.quant.config import QuantConfig, w4_weight_only, w8a8, w8a8_dynamic
from edgeslim.quant.fold import fold_batchnorm
from edgeslim.quant.spec import QuantConfigError, QuantSpec

__all__ = [
    "QuantConfig",
    "QuantConfigError",
    "QuantSpec",
    "calibrate",
    "fold_batchnorm",
    "quant_layers",
    "quantize_",
    "set_progress",
    "w4_weight_only",
    "w8a8",
    "w8a8_dynamic",
]
