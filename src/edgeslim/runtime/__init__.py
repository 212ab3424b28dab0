"""Runtimes that execute exported models (ONNX Runtime)."""
