"""Export to deployable artifacts: ONNX (fp32 now; QDQ int8 comes with quantization)."""

from edgeslim.export.onnx import OnnxParity, export_onnx, onnx_parity

__all__ = ["OnnxParity", "export_onnx", "onnx_parity"]
