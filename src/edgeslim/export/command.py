"""``edgeslim export onnx``: a model (optionally run through a recipe) to a checked ONNX file.

Quantized models export as int8 QDQ. The file is checked against torch on the example
inputs and held input batches of the task, every output compared; the task's headline
metric is measured in torch and in ONNX Runtime, and a gap beyond ``tolerance`` (a fraction
of the metric's scale) is an error, so a file that does not compute what was measured in
torch is never presented as good.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.task import Task


@dataclass(frozen=True)
class ExportCheck:
    """What the export wrote and how it compares with torch."""

    path: Path
    quantized: bool
    metric: str
    torch_value: float
    ort_value: float
    max_abs_diff: list[float]
    inputs_checked: int
    int8_mac_share: float | None = None  # MACs in ONNX Runtime's integer kernels (int8 only)


def export_checked(
    model: nn.Module, task: Task, out: Path, reference: nn.Module | None = None,
    tolerance: float = 0.005,
) -> ExportCheck:  # fmt: skip
    """Export ``model`` for ``task`` and check it in ONNX Runtime.

    ``reference`` is the uncompressed model agreement is measured against (default:
    ``model`` itself). ``tolerance``: largest allowed gap between the torch and the ONNX
    Runtime metric, as a fraction of ``max(|torch value|, 1)`` (0.46 points at 92% top-1).
    """
    from edgeslim.export.verify import check_parity, export_axes, export_module, output_batch_dims
    from edgeslim.quant.modules import QuantMixin
    from edgeslim.runtime.ort import OrtModel, ort_session

    task.check(model)
    task.bind_reference(reference if reference is not None else model)
    module = task.module(model).eval()
    dims = output_batch_dims(module, task.inputs_at(1), task.inputs_at(2))
    axes = export_axes(task.names, task.dims, dims)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise EdgeslimError(f"--out {out} is a folder; give the path of the .onnx file to write")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        path = export_module(module, task.example_inputs, tmp, axes)
        session = ort_session(path)
        parity = check_parity(
            module, session, [task.example_inputs, *task.validation_batches()[:3]]
        )
        torch_m = task.measure(model)
        ort_m = task.measure(OrtModel(session), wrapped=True)
        name = next(iter(torch_m))
        gap = abs(ort_m[name] - torch_m[name])
        if gap > tolerance * max(abs(torch_m[name]), 1.0):
            raise EdgeslimError(
                f"the exported file scores {name} {ort_m[name]:.4g} in ONNX Runtime but the "
                f"torch model {torch_m[name]:.4g} ({parity.describe()}); the export does not "
                "compute what torch computed. Report this with the model."
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    quantized = any(isinstance(m, QuantMixin) for m in module.modules())
    share = None
    if quantized:
        from edgeslim.runtime.kernels import check_integer_kernels

        share = check_integer_kernels(out, task.example_inputs).int8_mac_share
    return ExportCheck(
        out, quantized, name, torch_m[name], ort_m[name], parity.max_abs_diff,
        parity.inputs_checked, share,
    )  # fmt: skip
