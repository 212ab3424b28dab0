"""Low-bit QAT recipe on the shipped resnet20 and real Fashion-MNIST images."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.data.batching import augmented_batches
from edgeslim.distill import KDConfig
from edgeslim.export.packed import load_packed, save_packed
from edgeslim.quant import lowbit
from edgeslim.quant.api import quant_layers
from edgeslim.quant.lowbit import (
    LowBitRecipe,
    edge_layers,
    float_weights,
    is_quantizer_param,
    lowbit_qat,
)
from edgeslim.quant.spec import QuantConfigError
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    train = load_fashion_mnist("train", limit=192)
    val = load_fashion_mnist("val", limit=200)
    return {
        "train": train,
        "val": TensorBatches(val.images, val.labels, 200),
        "calib": [(val.images[i : i + 64],) for i in range(0, 128, 64)],
    }


def _run(recipe: LowBitRecipe, data: dict[str, object]) -> tuple[nn.Module, object]:
    fp32 = load_zoo_model("resnet20")
    train = data["train"]
    res = lowbit_qat(
        fp32,
        recipe,
        augmented_batches(train.images, train.labels, 64),  # type: ignore[attr-defined]
        data["calib"],  # type: ignore[arg-type]
        val=data["val"],  # type: ignore[arg-type]
    )
    return fp32, res


def test_edges_stay_8_bit_and_inner_layers_take_the_recipe_bits(data: dict[str, object]) -> None:
    fp32, res = _run(LowBitRecipe(w_bits=1, a_bits=1, distill=(KDConfig(),)), data)
    layers = quant_layers(res.model)  # type: ignore[attr-defined]
    assert res.edge_layers == ["conv1", "fc"] == edge_layers(fp32)  # type: ignore[attr-defined]
    for fqn, m in layers.items():
        assert m.weight_quantizer is not None and m.input_quant is not None
        w, a = m.weight_quantizer.spec, m.input_quant.spec
        if fqn in ("conv1", "fc"):
            assert (w.bits, a.bits, w.quantizer) == (8, 8, "uniform")
        else:  # XNOR-Net: scaled sign, one learned alpha per output channel
            assert (w.bits, a.bits, w.quantizer) == (1, 1, "binary")
            alpha = m.weight_quantizer.range_param
            assert isinstance(alpha, nn.Parameter) and alpha.numel() == m.weight.shape[0]
            qw = m.quant_weight().detach().flatten(1)
            assert torch.equal(qw.abs(), alpha.detach()[:, None].expand_as(qw))
    # the teacher is untouched and BatchNorm is kept (not folded) for re-estimation
    assert any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())  # type: ignore[attr-defined]
    assert not quant_layers(fp32)
    assert res.history and res.seconds > 0  # type: ignore[attr-defined]


def test_scales_are_learned(data: dict[str, object]) -> None:
    """LSQ moves the weight and activation scales (lr 0 keeps them at calibration)."""
    fp32 = load_zoo_model("resnet20")
    _, trained = _run(LowBitRecipe(w_bits=4, a_bits=4, bn_reestimate=False), data)
    _, still = _run(LowBitRecipe(w_bits=4, a_bits=4, bn_reestimate=False, lr=0.0), data)
    names = [n for n, _ in trained.model.named_parameters() if is_quantizer_param(n)]  # type: ignore[attr-defined]
    assert any(n.endswith("weight_quantizer.scale") for n in names)
    assert any("input_quant" in n for n in names)
    assert not any(is_quantizer_param(n) for n, _ in fp32.named_parameters())
    for n in (
        "layer1.0.conv1.weight_quantizer.scale",
        "layer2.0.conv2.input_quant.quantizer.scale",
    ):
        a = trained.model.get_parameter(n)  # type: ignore[attr-defined]
        b = still.model.get_parameter(n)  # type: ignore[attr-defined]
        assert not torch.equal(a, b), n


class _Unused(nn.Module):
    """A weight whose gradient is exactly zero: only weight decay can move it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0.0 * self.scale.sum()


def test_no_decay_keeps_weight_decay_off_the_named_parameters() -> None:
    from edgeslim.train.loop import TrainConfig, train_classifier

    batches = [((torch.randn(8, 4),), torch.randint(0, 2, (8,))) for _ in range(4)]
    cfg = TrainConfig(epochs=2, lr=0.5, weight_decay=0.1, channels_last=False)
    decayed, kept = _Unused(), _Unused()
    train_classifier(decayed, batches, cfg)
    train_classifier(kept, batches, cfg, no_decay=lambda n: n == "scale")
    assert float(decayed.scale.detach().max()) < 0.9
    assert torch.equal(kept.scale, torch.ones(3))


def test_float_weights_round_trip_into_the_float_architecture(data: dict[str, object]) -> None:
    fp32, res = _run(LowBitRecipe(w_bits=2, a_bits=2, bn_reestimate=False), data)
    latent = copy.deepcopy(fp32)
    latent.load_state_dict(float_weights(res.model, latent))  # type: ignore[attr-defined]
    assert torch.equal(latent.layer2[0].conv1.weight, res.model.layer2[0].conv1.weight)  # type: ignore[attr-defined]
    assert not torch.equal(latent.layer2[0].conv1.weight, fp32.layer2[0].conv1.weight)


def test_progressive_schedule_trains_each_stage(data: dict[str, object]) -> None:
    r = LowBitRecipe(w_bits=1, a_bits=1, progressive=(4, 2), bn_reestimate=False)
    assert r.total_epochs == 3
    _, res = _run(r, data)
    assert [(h["w_bits"], h["a_bits"]) for h in res.history] == [(4, 4), (2, 2), (1, 1)]  # type: ignore[attr-defined]
    with pytest.raises(QuantConfigError, match="must not go below"):
        LowBitRecipe(w_bits=4, a_bits=4, progressive=(2,))


def test_progressive_stage_calibrates_on_reestimated_batchnorm(
    data: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later stage calibrates its activation ranges with BN statistics re-estimated for
    the latent weights, not those carried over (gathered on the previous stage's quantized
    forward; on resnet20 W2A2 -> W1A1 they made the 1-bit steps 5x too wide). Here the
    carried statistics are made wrong on purpose (running variances x50), the weights are
    kept (lr 0) and the variance each stage calibrates with is recorded."""
    seen: list[float] = []
    real = lowbit.calibrate

    def spy(model: nn.Module, *args: object, **kw: object) -> object:
        seen.append(float(model.layer2[0].bn1.running_var.mean()))  # type: ignore[index]
        return real(model, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lowbit, "calibrate", spy)
    fp32 = load_zoo_model("resnet20")
    true_var = float(fp32.layer2[0].bn1.running_var.mean())  # type: ignore[index]
    for m in fp32.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(50.0)
    train = data["train"]
    lowbit_qat(
        fp32,
        LowBitRecipe(w_bits=2, a_bits=2, progressive=(4,), bn_reestimate=False, lr=0.0),
        augmented_batches(train.images, train.labels, 64),  # type: ignore[attr-defined]
        data["calib"],  # type: ignore[arg-type]
    )
    assert len(seen) == 2 and seen[0] > 20 * true_var
    assert seen[1] < 5 * true_var, (seen, true_var)


def test_invalid_recipe_fails_at_construction() -> None:
    with pytest.raises(QuantConfigError, match="ternary"):
        LowBitRecipe(w_bits=1, a_bits=8, weight_quantizer="ternary")
    with pytest.raises(QuantConfigError, match="unknown estimator"):
        LowBitRecipe(estimator="nope")


@pytest.mark.parametrize(("quantizer", "w_bits", "code_bits"), [("auto", 1, 1), ("ternary", 2, 2)])
def test_binary_and_ternary_pack_bit_exact_at_1_and_2_bits(
    quantizer: str, w_bits: int, code_bits: int, data: dict[str, object], tmp_path: Path
) -> None:
    r = LowBitRecipe(w_bits=w_bits, a_bits=8, weight_quantizer=quantizer, bn_reestimate=False)
    fp32, res = _run(r, data)
    model = res.model  # type: ignore[attr-defined]
    st_path, json_path = save_packed(model, tmp_path / "m")
    loaded = load_packed(copy.deepcopy(fp32), tmp_path / "m")
    import json

    meta = json.loads(json_path.read_text())["layers"]
    from safetensors.torch import load_file

    tensors = load_file(str(st_path))
    for fqn, m in quant_layers(model).items():
        want = m.quant_weight().detach()
        got = loaded.get_submodule(fqn).weight
        assert torch.equal(got, want), fqn  # bit-exact
        bits = 8 if fqn in ("conv1", "fc") else code_bits
        assert meta[fqn]["bits"] == bits
        assert tensors[f"{fqn}.weight.codes"].numel() == math.ceil(want.numel() * bits / 8)
        if bits == 2:
            assert set(want.flatten(1)[0].unique().abs().tolist()) <= {
                0.0,
                float(m.weight_quantizer.range_param[0]),  # type: ignore[union-attr]
            }


@pytest.mark.slow  # two QAT runs on 384 images, ~1-2 min on 2 cores
def test_recipe_beats_plain_ste_at_w2a2_on_real_data() -> None:
    """Same images, same steps: the recipe (LSQ, KD, BN re-estimation) must score higher
    than the plain STE baseline."""
    fp32 = load_zoo_model("resnet20")
    train = load_fashion_mnist("train", limit=384)
    val = load_fashion_mnist("val", limit=300)
    test = load_fashion_mnist("test", limit=800)
    calib = [(val.images[i : i + 64],) for i in range(0, 256, 64)]
    vb = TensorBatches(val.images, val.labels, 300)
    scores = {}
    recipe = LowBitRecipe(w_bits=2, a_bits=2, distill=(KDConfig(alpha=0.9),))
    plain = LowBitRecipe(w_bits=2, a_bits=2, estimator="ste", act_estimator="ste",
                         bn_reestimate=False, scale_weight_decay=True)  # fmt: skip
    for name, r in (("recipe", recipe), ("plain", plain)):
        res = lowbit_qat(fp32, r, augmented_batches(train.images, train.labels, 64), calib, val=vb)
        scores[name] = evaluate(res.model, test)
    assert scores["recipe"] > scores["plain"], scores
