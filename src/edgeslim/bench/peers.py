"""Peer tools measured beside edgeslim on the same model and data: ONNX Runtime's static
quantization and torch's FX int8 path, each configured the way its documentation
recommends for CPU int8 (QDQ, per-channel int8 weights, uint8 activations; x86 backend);
and Torch-Pruning's magnitude pruner at a MACs target."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def ort_quantize_static(
    fp32_onnx: Path, out: Path, calib: torch.Tensor, input_name: str, reduce_range: bool = False
) -> Path:
    """``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, U8S8, MinMax);
    ``reduce_range``: 7-bit weights, ONNX Runtime's advice for x86 CPUs without VNNI."""
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
        reduce_range=reduce_range,
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


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layers that write the model's output (the classifier), found by edgeslim's graph."""
    from edgeslim.graph import analyze

    graph = analyze(model, example_input)
    names = [p for g in graph.groups if g.reason == "model output" for p in g.producers]
    return [model.get_submodule(n) for n in dict.fromkeys(names)]


def torch_pruning_magnitude(
    model: nn.Module,
    example_input: torch.Tensor,
    macs_reduction: float,
    round_to: int = 1,
    global_pruning: bool = True,
    max_pruning_ratio: float = 0.9,
    tolerance: float = 0.01,
    info: dict[str, Any] | None = None,
) -> nn.Module:
    """Torch-Pruning (PyPI ``torch-pruning``) magnitude pruning to a MACs target; a copy.

    Configured as its README and benchmarks do: ``MetaPruner`` with
    ``MagnitudeImportance(p=1)`` (group L1 norm, mean-normalised per group), global ranking,
    the classifier in ``ignored_layers``, ``round_to`` and ``max_pruning_ratio`` as given.
    Torch-Pruning takes a channel ratio, not a MACs target, so the ratio is searched until
    edgeslim's MAC counter shows a reduction in ``[target, target + tolerance]``: a grid
    finds the first ratio that reaches the target, then bisection narrows it (each trial
    prunes a fresh copy in one step). Its ``round_to`` rounds kept widths *down* and makes
    the reduction jump (resnet20: 15 of 16 channels kept becomes 8), so when no ratio lands
    within ``3 * tolerance`` the search is repeated without rounding and the closer result
    wins; ``info`` (if given) receives the ratio, rounding and reduction used.
    """
    import torch_pruning as tp

    from edgeslim.graph import layer_table, total_macs

    base = total_macs(layer_table(model, example_input))

    def attempt(ratio: float, rt: int) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                m, example_input, importance=tp.importance.MagnitudeImportance(p=1),
                global_pruning=global_pruning, pruning_ratio=ratio,
                max_pruning_ratio=max_pruning_ratio, ignored_layers=output_layers(m, example_input),
                round_to=rt if rt > 1 else None,
            )  # fmt: skip
            pruner.step()
        return m, 1.0 - total_macs(layer_table(m, example_input)) / base

    def search(rt: int) -> tuple[nn.Module, float, float] | None:
        """The trial with the smallest reduction >= target: grid to the first crossing, bisect."""
        best: tuple[nn.Module, float, float] | None = None
        lo = 0.0
        for k in range(1, int(max_pruning_ratio / 0.05 + 1e-9) + 1):
            ratio = round(k * 0.05, 4)
            m, red = attempt(ratio, rt)
            if red >= macs_reduction:
                best, hi = (m, red, ratio), ratio
                break
            lo = ratio
        if best is None:
            return None
        for _ in range(10):
            if best[1] <= macs_reduction + tolerance:
                break
            mid = (lo + hi) / 2
            m, red = attempt(mid, rt)
            if red >= macs_reduction:
                hi = mid
                if red < best[1]:
                    best = (m, red, mid)
            else:
                lo = mid
        return best

    found = search(round_to)
    used = round_to
    if round_to > 1 and (found is None or found[1] > macs_reduction + 3 * tolerance):
        plain = search(1)
        if plain is not None and (found is None or plain[1] < found[1]):
            found, used = plain, 1
    if found is None:
        raise ValueError(
            f"torch-pruning cannot remove {macs_reduction:.0%} of the MACs with "
            f"max_pruning_ratio={max_pruning_ratio}"
        )
    if info is not None:
        info.update(ratio=round(found[2], 4), round_to=used, macs_reduction=round(found[1], 4))
    return found[0].eval()
