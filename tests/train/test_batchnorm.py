"""BatchNorm re-estimation, on the shipped resnet20 and Fashion-MNIST images."""

from __future__ import annotations

import torch

from edgeslim.data import load_fashion_mnist
from edgeslim.train.batchnorm import reestimate_bn
from edgeslim.zoo import load_zoo_model


def test_bn_reestimation_recomputes_running_stats() -> None:
    model = load_zoo_model("resnet20")
    images = load_fashion_mnist("val", limit=128).images
    bn = model.bn1
    bn.running_mean.fill_(5.0)
    used = reestimate_bn(model, [(images[:64], None), (images[64:], None)], max_batches=1)
    assert used == 1 and bn.momentum == 0.1  # momentum restored
    with torch.no_grad():
        x = model.conv1(images[:64])
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert not model.training


def test_bn_reestimation_takes_plain_input_batches_and_restores_eval_mode() -> None:
    model = load_zoo_model("resnet20").eval()
    images = load_fashion_mnist("val", limit=64).images
    model.bn1.running_var.fill_(9.0)
    assert reestimate_bn(model, [(images,)], max_batches=4) == 1
    assert not model.training and float(model.bn1.running_var.max()) < 9.0
    assert reestimate_bn(torch.nn.Linear(2, 2), [(images,)], 1) == 0  # no BatchNorm: nothing
