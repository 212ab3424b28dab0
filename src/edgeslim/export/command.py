"""``edgeslim export onnx``: a model (optionally run through a recipe) to a checked ONNX file.

Quantized models export as int8 QDQ; the file's top-1 in ONNX Runtime is compared with the
torch model's (fake-quant for quantized models) on test images, and a mismatch beyond
``tolerance`` points is an error, so a file that does not compute what was measured in
torch is never presented as good.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgeslim.errors import EdgeslimError


@dataclass(frozen=True)
class ExportCheck:
    """What the export wrote and how it compares with torch."""

    path: Path
    quantized: bool
    torch_top1: float
    ort_top1: float
    images: int


def export_checked(
    model: nn.Module, out: Path, images: int = 2000, tolerance: float = 0.3
) -> ExportCheck:
    """Export ``model`` (QDQ if it has quantized layers) and check it in ONNX Runtime."""
    from edgeslim.data import load_fashion_mnist
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.qdq import export_qdq
    from edgeslim.quant.modules import QuantMixin
    from edgeslim.runtime.ort import ort_session, ort_top1
    from edgeslim.train.loop import evaluate

    test = load_fashion_mnist("test", limit=images)
    example = (test.images[:1].contiguous(),)
    quantized = any(isinstance(m, QuantMixin) for m in model.modules())
    if quantized:
        path = export_qdq(copy.deepcopy(model), example, out)
    else:
        path = export_onnx(model, example, out)
    torch_top1 = evaluate(model, test)
    ort = ort_top1(ort_session(path), test.images, test.labels)
    if abs(ort - torch_top1) > tolerance:
        raise EdgeslimError(
            f"the exported {path} scores {ort:.2f}% top-1 in ONNX Runtime but the torch model "
            f"{torch_top1:.2f}% on {len(test)} test images (tolerance {tolerance} points); "
            "the export does not compute what torch computed. Report this with the model."
        )
    return ExportCheck(path, quantized, torch_top1, ort, len(test))
