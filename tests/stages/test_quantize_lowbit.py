"""Recipes with binary, ternary and power-of-two weights end in an ONNX file that runs their
levels on ONNX Runtime's int8 kernels; a codebook with quantized activations is refused when
the recipe is read; a smooth estimator trained by a ``finetune`` stage ends hard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.errors import RecipeError
from edgeslim.quant.modules import QuantMixin
from edgeslim.recipe.schema import parse_recipe
from edgeslim.runtime.ort import ort_fused_ops
from edgeslim.task import Task


def _digits_task() -> tuple[nn.Module, Task, torch.Tensor]:
    """A small CNN trained on sklearn's 8x8 digits (real data), and its task."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
        opt.step()
    task = Task(
        example_inputs=(x[:1],),
        calibration=TensorBatches(x[:256], batch_size=64),
        train=TensorBatches(x[:1200], y[:1200], batch_size=64),
        validation=TensorBatches(x[1400:], y[1400:], batch_size=128),
    )
    return model.eval(), task, x[1400:]


@pytest.mark.parametrize(
    ("quantizer", "bits", "estimator"),
    [("ternary", 2, "aqe"), ("binary", 1, "ste"), ("pow2", 4, "nbq")],
)
def test_low_bit_recipes_export_their_levels_on_int8_kernels(
    quantizer: str, bits: int, estimator: str, tmp_path: Path
) -> None:
    model, task, held = _digits_task()
    recipe = {"name": quantizer, "stages": [
        {"kind": "quantize", "w_bits": bits, "a_bits": 8, "quantizer": quantizer,
         "estimator": estimator},
        {"kind": "finetune", "epochs": 2, "lr": 0.01, "batch_size": 64},
    ]}  # fmt: skip
    result = edgeslim.compress(model, recipe, task, tmp_path / "out", quick=True)
    layers = [m for m in result.model.modules() if isinstance(m, QuantMixin)]
    assert layers and all(m.w_estimator.progress == 1.0 for m in layers)  # ends hard
    for layer in layers:  # the torch model computes with the levels themselves
        with torch.no_grad():
            w = layer.quant_weight()
        levels = layer.weight_quantizer.levels()
        assert torch.isin(w, levels).all()
    torch_rec, ort_rec = result.records
    assert abs(torch_rec.value - ort_rec.value) <= 1.0  # points of agreement
    import onnxruntime as ort

    fused = ort_fused_ops(result.paths["onnx"])
    assert fused.get("QLinearConv") == 2 and "Conv" not in fused
    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: held.numpy()})[0]
    with torch.no_grad():
        want = result.model(held).numpy()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    _check_packed(result)


def _check_packed(result: edgeslim.CompressResult) -> None:
    """``model-packed.safetensors`` holds every quantized weight as its codes at its bits,
    decoding to the levels the model computes with, in about the bytes the record states."""
    import json

    from safetensors.torch import load_file

    from edgeslim.export.packed import stored_levels, unpack_codes

    path = result.paths["packed"]
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    for fqn, info in meta["layers"].items():
        layer = result.model.get_submodule(fqn)
        groups, per = info["groups"]
        codes = unpack_codes(tensors[f"{fqn}.weight.codes"], info["bits"], groups * per)
        values = stored_levels(tensors, fqn).gather(1, codes.reshape(groups, per))
        with torch.no_grad():
            want = layer.quant_weight().reshape(groups, -1)
        torch.testing.assert_close(values[:, : want.shape[1]], want, rtol=0, atol=1e-6)
    record = result.records[0]
    assert record.extra["packed_bytes"] == path.stat().st_size
    assert path.stat().st_size < 0.5 * result.paths["weights"].stat().st_size
    # the integer grids store one row of codes and a scale per channel, no float table
    assert not any(k.endswith(".levels") for k in tensors)


def test_a_nbq_quantize_stage_alone_measures_the_quantized_model(tmp_path: Path) -> None:
    """n-BQ blends float and quantized weights by training progress; untrained, the stage
    must give the hard quantizer (it once measured and saved the float weights)."""
    model, task, _ = _digits_task()
    recipe = {"name": "p", "stages": [{"kind": "quantize", "w_bits": 2, "a_bits": 8,
                                       "quantizer": "pow2", "estimator": "nbq"}]}  # fmt: skip
    result = edgeslim.compress(model, recipe, task, tmp_path / "out", quick=True)
    conv = next(m for m in result.model.modules() if isinstance(m, QuantMixin))
    with torch.no_grad():
        assert torch.equal(conv.quant_weight(), conv.weight_quantizer.quantize(conv.weight))
    rows = conv.quant_weight().detach().flatten(1)
    assert all(len(torch.unique(row)) <= 3 for row in rows)  # {0, +-s} per channel


@pytest.mark.parametrize(("quantizer", "bits"), [("codebook", 3), ("pow2", 6)])
def test_float_level_grids_with_quantized_activations_are_refused_on_reading(
    quantizer: str, bits: int
) -> None:
    stage = {"kind": "quantize", "w_bits": bits, "a_bits": 8, "quantizer": quantizer}
    with pytest.raises(RecipeError, match="a_bits: null"):
        parse_recipe({"name": "c", "stages": [stage]})
    parse_recipe({"name": "c", "stages": [{**stage, "a_bits": None}]})  # weight-only: fine
    # a select entry is held to the same rule
    entry = {"kind": "quantize", "w_bits": 8, "a_bits": 8,
             "select": {"fc": {"quantizer": quantizer, "w_bits": bits}}}  # fmt: skip
    with pytest.raises(RecipeError, match=r"select 'fc'.*a_bits: null"):
        parse_recipe({"name": "c", "stages": [entry]})


def test_windowed_weight_estimators_leave_the_activations_to_ste() -> None:
    from edgeslim.stages.quantize import QuantizeStage, stage_config

    def act(**fields: object) -> str:
        return str(stage_config(QuantizeStage.model_validate(fields)).activation.estimator)

    assert act(estimator="aqe") == "ste"  # its surrogate sums a window per element
    assert act(estimator="tanh") == "tanh"  # one interval per element: cheap
    assert act(estimator="lsq") == "lsq" and act(estimator="nbq") == "nbq"
    assert act(estimator="aqe", act_estimator="pact") == "pact"
    with pytest.raises(ValueError, match="estimator"):
        QuantizeStage(act_estimator="nope")
