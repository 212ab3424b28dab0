"""QAT on real data recovers what PTQ loses at low bit-widths."""

from __future__ import annotations

import copy

from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.data.batching import augmented_batches
from edgeslim.quant import QuantConfig, QuantSpec, calibrate, quantize_
from edgeslim.quant.qat import qat_train
from edgeslim.train.loop import TrainConfig, evaluate
from edgeslim.zoo import load_zoo_model


def _w2a4(estimator: str) -> QuantConfig:
    return QuantConfig(
        QuantSpec(bits=2, estimator=estimator),
        QuantSpec(bits=4, granularity="tensor", symmetric=False, estimator=estimator),
    )


def test_qat_with_kd_recovers_low_bit_accuracy() -> None:
    fp32 = load_zoo_model("vgg-small")
    split = load_fashion_mnist("train", limit=3000)
    train = augmented_batches(split.images, split.labels, 64)
    calib = load_fashion_mnist("val", limit=256).images
    test_split = load_fashion_mnist("test", limit=1000)
    test = TensorBatches(test_split.images, test_split.labels, 500)
    model = copy.deepcopy(fp32)
    quantize_(model, _w2a4("ste"), select={"features.0": None, "classifier.3": None})
    calibrate(model, [calib[i : i + 64] for i in range(0, 256, 64)], progress=False)
    ptq = evaluate(model, test)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=64, channels_last=False)
    qat_train(model, train, cfg, teacher=fp32)
    qat = evaluate(model, test)
    assert qat > ptq + 5.0 and qat > 80.0
