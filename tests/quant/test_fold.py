from __future__ import annotations

import copy

import torch
from torch import nn

from edgeslim.quant import fold_batchnorm
from edgeslim.zoo import load_zoo_model


def test_folding_keeps_outputs_on_real_images(fmnist_test_small) -> None:  # type: ignore[no-untyped-def]
    model = load_zoo_model("resnet20")
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded)
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert len(pairs) == 21  # 19 convs with BN + 2 downsample convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = fmnist_test_small.images[:64]
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)


def test_bn_after_a_shared_conv_is_not_folded() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert fold_batchnorm(Shared()) == []
