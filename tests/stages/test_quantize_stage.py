"""The quantize stage's ``reduce_range``: 7-bit weights, which ONNX Runtime's int8 kernels
cannot overflow on x86 CPUs without VNNI (where full-range weights saturate)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.errors import Int8SaturationWarning
from edgeslim.export.verify import Parity
from edgeslim.quant.modules import QuantMixin
from edgeslim.runtime.machine import int8_sums_saturate
from edgeslim.stages.quantize import QuantizeStage, select_config, stage_config
from edgeslim.task import Task


def test_reduce_range_takes_8_bit_uniform_weights_to_7_bits_only() -> None:
    assert stage_config(QuantizeStage(reduce_range=True)).weight.bits == 7
    assert stage_config(QuantizeStage()).weight.bits == 8  # the default, as ONNX Runtime's
    assert stage_config(QuantizeStage(w_bits=4, reduce_range=True)).weight.bits == 4
    stage = QuantizeStage(w_bits=4, reduce_range=False, select={"head": {"w_bits": 8}})
    assert select_config(stage, "head", {"w_bits": 8}).weight.bits == 8
    assert select_config(stage, "head", {"w_bits": 8, "reduce_range": True}).weight.bits == 7


def test_reduce_range_auto_follows_this_cpus_int8_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeslim.runtime.machine as machine

    for saturates, bits in ((True, 7), (False, 8)):
        monkeypatch.setattr(machine, "int8_sums_saturate", lambda s=saturates: s)
        assert stage_config(QuantizeStage(reduce_range="auto")).weight.bits == bits
    # other grids keep their own levels, with no error for auto
    assert (
        stage_config(QuantizeStage(w_bits=4, quantizer="pow2", reduce_range="auto")).weight.bits
        == 4
    )
    with pytest.raises(ValueError, match="reduce_range"):
        QuantizeStage(reduce_range="sometimes")  # type: ignore[arg-type]


def test_reduce_range_on_a_grid_it_cannot_narrow_is_refused() -> None:
    with pytest.raises(ValueError, match="reduce_range"):
        QuantizeStage(quantizer="pow2", w_bits=4, reduce_range=True)


def _saturating_model() -> nn.Module:
    """A 1x1 conv whose int8 weights are all +127 within a channel: on large inputs every
    pair of products overflows a signed 16-bit sum (255 * 127 * 2 > 32767)."""
    conv = nn.Conv2d(32, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).expand(2, 32, 1, 1) / 32)
    return nn.Sequential(nn.ReLU(), conv).eval()


def _ort_error(result: edgeslim.CompressResult, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = result.model(x).numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("reduce_range", [False, True, "auto"])
def test_reduce_range_files_compute_as_torch_on_every_cpu(
    tmp_path: Path, reduce_range: bool | str
) -> None:
    x = torch.rand(16, 32, 4, 4, generator=torch.Generator().manual_seed(0)) * 4
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=8))
    recipe = {"name": "q", "stages": [{"kind": "quantize", "reduce_range": reduce_range}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = edgeslim.compress(_saturating_model(), recipe, task, tmp_path / "o", quick=True)
    (layer,) = [m for m in result.model.modules() if isinstance(m, QuantMixin)]
    assert layer.qconfig.weight is not None
    narrowed = reduce_range is True or (reduce_range == "auto" and int8_sums_saturate())
    assert layer.qconfig.weight.bits == (7 if narrowed else 8)
    if reduce_range == "auto":  # the record says which range auto chose here
        chosen = "7-bit weight range" if narrowed else "full 8-bit weights (reduce_range auto"
        assert any(n.startswith("quantize:") and chosen in n for n in result.notes)
    error = _ort_error(result, x)
    said = [str(w.message) for w in caught if issubclass(w.category, Int8SaturationWarning)]
    if reduce_range or not int8_sums_saturate():
        assert error < 0.05  # rounding only
        assert not said
    else:  # this CPU's kernels overflow: the file is wrong here, and compress says so
        assert error > 0.05
        assert said and "reduce_range: true" in said[0]
        assert any("saturate" in n for n in result.notes)


def test_the_saturation_note_needs_a_saturating_cpu_and_full_range_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgeslim import compression
    from edgeslim.quant import QuantConfig
    from edgeslim.quant.api import quantize_
    from edgeslim.quant.spec import QuantSpec

    model = nn.Sequential(nn.Linear(4, 4))
    quantize_(model, QuantConfig(QuantSpec(bits=8), None))  # in place
    off = Parity(max_abs_diff=[0.3], max_rel_diff=[0.3], inputs_checked=4)
    close = Parity(max_abs_diff=[0.01], max_rel_diff=[0.01], inputs_checked=4)
    for saturates, parity, want in [(True, off, 1), (False, off, 0), (True, close, 0)]:
        monkeypatch.setattr(
            "edgeslim.runtime.machine.int8_sums_saturate", lambda saturates=saturates: saturates
        )
        notes: list[str] = []
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            compression.saturation_note(model, parity, notes)
        assert len(notes) == want
