from __future__ import annotations

import subprocess
import sys

import edgeslim


def test_import_is_lean() -> None:
    code = (
        "import sys, edgeslim, edgeslim.graph, edgeslim.cost, edgeslim.zoo; "
        "heavy = [m for m in ('onnxruntime', 'transformers', 'matplotlib', 'onnx') "
        "if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_resolves() -> None:
    for name in edgeslim.__all__:
        assert getattr(edgeslim, name) is not None
