"""ONNX export with a parity check against torch.

Every exported graph then gets the exact, speed-only rewrites of
:mod:`edgeslim.export.rewrite` (e.g. PReLU as ``Max(x, a x)``).

Decision: the TorchScript exporter (``dynamo=False``) is the default. On torch 2.13 it
exports the zoo CNNs about 4x faster than the torch.export-based exporter with identical
outputs, which matters when a benchmark exports dozens of variants; pass
``exporter="dynamo"`` for models only the new exporter handles.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.errors import EdgeslimError, ExportError
from edgeslim.graph.swap import swapped
from edgeslim.graph.trace import GENERAL_BATCH_ATTR, inputs_only, user_frame

NOT_CONSTANT_HINT = (
    "A size computed from a tensor's shape at run time (e.g. `F.avg_pool2d(x, x.shape[2:])` "
    "or `x.size(2)` as a kernel size) must be a constant in ONNX: use "
    "`nn.AdaptiveAvgPool2d(1)` or `x.mean((2, 3), keepdim=True)` for a global pool, or a "
    "fixed size."
)


def _export_advice(model: nn.Module, exc: Exception) -> str:
    """One paragraph from torch's export error: its first lines, and what to change."""
    first = " ".join(str(exc).split())[:400]
    hint = NOT_CONSTANT_HINT if "not constant" in str(exc) else (
        "Keep the failing op's layer out of the model or rewrite it with standard ops; the "
        "node's scope above names the module."
    )  # fmt: skip
    return f"ONNX export of {type(model).__name__} failed: {first} {hint}"


def _traced_path_advice(model: nn.Module, exc: Exception) -> str:
    """The model ran before (it was measured) but raised under the exporter: its code takes
    another path when traced (Nystromformer: Hugging Face's mask is skipped when all ones,
    but kept under tracing, and the model's landmark attention cannot add it)."""
    first = " ".join(str(exc).split())[:300]
    where = user_frame(exc, outside=("/edgeslim/",))
    return (
        f"ONNX export of {type(model).__name__} failed while torch's exporter ran the "
        f"model, at {where}: {type(exc).__name__}: {first}. The model runs outside the "
        "exporter, so its code takes another path when traced (it checks "
        "`torch.jit.is_tracing()`, as Hugging Face's attention masks do, or a value "
        "computed in Python becomes a traced one); fix or avoid that path, or keep that "
        "layer out of the model."
    )


def _at_batch_two(
    examples: tuple[torch.Tensor, ...], names: list[str], axes: dict[str, dict[int, str]]
) -> tuple[torch.Tensor, ...]:
    """Each example repeated along its dynamic batch axis: a model whose code takes another
    branch at batch 1 (GPT-2's masks expand position ids only when the batch differs) is
    exported on the general one, which also holds at batch 1 (checked when traced)."""
    out = []
    for x, name in zip(examples, names, strict=False):
        dims = [d for d, label in axes.get(name, {}).items() if label == "batch"]
        out.append(torch.cat([x, x], dims[0]) if dims and x.shape[dims[0]] == 1 else x)
    return tuple(out)


def export_onnx(
    model: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
    opset: int = 17,
) -> Path:
    """Export ``model`` (in eval mode) to ``path``; the batch axis is dynamic by default."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = input_names or [f"input{i}" if i else "input" for i in range(len(example_args))]
    output_names = output_names or ["output"]
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    if getattr(model, GENERAL_BATCH_ATTR, False):
        example_args = _at_batch_two(example_args, input_names, dynamic_axes)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), inputs_only(model, len(example_args)), _exporter_fixes():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(
                    model,
                    example_args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
            else:
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} for _ in example_args)
                torch.onnx.export(
                    model,
                    example_args,
                    str(path),
                    dynamo=True,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=shapes,
                    external_data=False,
                )
    except torch.onnx.errors.OnnxExporterError as exc:  # SymbolicValueError and friends
        newer = _opset_needed(exc)
        if exporter == "torchscript" and newer is not None and opset < newer <= MAX_OPSET:
            # one op needs a newer opset (F.fold, MobileViTV2: col2im is opset 18): the
            # model is exported at that one, which ONNX Runtime runs, rather than refused
            model.train(was_training)
            try:
                return export_onnx(
                    model, example_args, path, input_names, output_names, dynamic_axes,
                    exporter, newer,
                )  # fmt: skip
            except Exception as again:
                raise ExportError(
                    f"{_export_advice(model, exc)} Exported at opset {newer} instead, it "
                    f"failed too: {type(again).__name__}: {str(again).splitlines()[0]}"
                ) from again
        advice = _export_advice(model, exc)
        free = sorted({name for axes in (dynamic_axes or {}).values() for name in axes.values()
                       if name != "batch"})  # fmt: skip
        if free:  # sizes the exporter cannot leave free (an adaptive pool to k > 1)
            advice += (f" The file was asked to leave {', '.join(free)} free (--dynamic-dims, "
                       "Task.dynamic_dims, or latency inputs of another size): without that "
                       "the op may export at the fixed size.")  # fmt: skip
        raise ExportError(advice) from exc
    except EdgeslimError:
        raise
    except Exception as exc:  # the model's own code raised while the exporter ran it
        raise ExportError(_traced_path_advice(model, exc)) from exc
    finally:
        model.train(was_training)
    _rewrite(path)
    return path


@contextmanager
def _exporter_fixes() -> Iterator[None]:
    """Work around torch exporter bugs and gaps, for the duration of one export.

    ``Tensor.unfold`` with a negative dimension: torch 2.13's TorchScript exporter writes
    the patches along the wrong axis (``x.unfold(-2, 8, 8)`` on ``(1, 32, 3)`` gives
    ``(1, 3, 4, 8)`` in ONNX against torch's ``(1, 4, 3, 8)``; PatchTST's and
    PatchTSMixer's files then failed to load). The same dimension counted from the front
    exports right.

    ``adaptive_avg_pool2d`` to a size that does not divide the input's (a pyramid pooling
    module's 3x3 and 6x6 bins: UperNet, PSPNet): torch's exporter refuses it. Each bin is
    the mean of its rows and columns, so the pool is ``P_h @ x @ P_w^T`` with constant
    averaging matrices (the spatial size is fixed in the exported model; only the batch is
    free), exact up to float rounding.

    ``torch.diff`` (Hugging Face's masks look for packed sequences with it): no ONNX
    symbolic; written as the difference of two slices, which is what it computes. The
    ``cumsum`` of a boolean tensor after it is int64 in torch; the exporter wrote a
    ``CumSum`` of booleans, which ONNX Runtime refuses: the booleans are cast first.
    """
    unfold = torch.Tensor.unfold
    pool = F.adaptive_avg_pool2d
    cumsum = torch.Tensor.cumsum

    def counting_cumsum(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return cumsum(x.long() if x.dtype == torch.bool else x, *args, **kwargs)

    def sliced_diff(
        x: torch.Tensor, n: int = 1, dim: int = -1, prepend: Any = None, append: Any = None
    ) -> torch.Tensor:
        parts = [t for t in (prepend, x, append) if t is not None]
        x = torch.cat(parts, dim) if len(parts) > 1 else x
        for _ in range(n):
            length = x.shape[dim]
            x = x.narrow(dim, 1, length - 1) - x.narrow(dim, 0, length - 1)
        return x

    def from_the_front(self: torch.Tensor, dimension: int, size: int, step: int) -> torch.Tensor:
        return unfold(self, dimension % max(self.dim(), 1), size, step)

    def binned(x: torch.Tensor, output_size: Any) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = (output_size, output_size) if isinstance(output_size, int) else output_size
        oh = h if size[0] is None else int(size[0])
        ow = w if size[1] is None else int(size[1])
        if h % oh == 0 and w % ow == 0:
            return pool(x, output_size)
        return _bins(oh, h, x.dtype) @ x @ _bins(ow, w, x.dtype).T

    with (
        swapped(torch.Tensor, {"unfold": from_the_front, "cumsum": counting_cumsum}),
        swapped(F, {"adaptive_avg_pool2d": binned}),
        swapped(torch, {"diff": sliced_diff}),
    ):
        yield


def _bins(out: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(out, size)``: row ``i`` averages adaptive pooling's bin ``i``, from
    ``floor(i * size / out)`` to ``ceil((i + 1) * size / out)``."""
    m = torch.zeros(out, size, dtype=dtype)
    for i in range(out):
        start, end = i * size // out, -(-(i + 1) * size // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


MAX_OPSET = 20  # the newest opset torch 2.13's TorchScript exporter writes (checked)


def _opset_needed(exc: Exception) -> int | None:
    """The opset torch's exporter says an unsupported op needs, if it says one."""
    import re

    found = re.search(r"added in version (\d+)", str(exc))
    return int(found.group(1)) if found else None


def _rewrite(path: Path) -> None:
    """Apply :mod:`edgeslim.export.rewrite` in place (the file is rewritten only if needed)."""
    import onnx

    from edgeslim.export.rewrite import rewrite_for_speed

    proto = onnx.load(str(path))
    if rewrite_for_speed(proto):
        onnx.save(proto, str(path))


@dataclass(frozen=True)
class OnnxParity:
    """Largest absolute difference between torch and ONNX Runtime outputs."""

    max_abs_diff: float
    ok: bool
    atol: float


def onnx_parity(
    model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...], atol: float = 1e-4
) -> OnnxParity:
    """Run the same inputs through torch and ONNX Runtime and compare the first output."""
    from edgeslim.runtime.ort import ort_session

    session = ort_session(path)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=False)}
    got = session.run(None, feeds)[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    model.train(was_training)
    ref = out if isinstance(out, torch.Tensor) else out[0]
    diff = float(np.abs(np.asarray(got) - ref.numpy()).max())
    return OnnxParity(diff, diff <= atol, atol)
