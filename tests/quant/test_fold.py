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


class CalledTwice(nn.Module):
    """A conv->BN block run twice (on two inputs), and a conv run twice with its BN after one
    call only: folding changes the module for every call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        for bn in (self.block[1], self.bn):
            bn.running_mean.uniform_(-1, 1)  # type: ignore[operator]
            bn.running_var.uniform_(0.5, 2)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.block(x), self.block(-x)  # both calls are the same pair: foldable
        return self.bn(self.conv(a)) + self.conv(b)  # conv's second call has no BN


def test_a_module_called_twice_is_folded_only_when_every_call_is_the_pair() -> None:
    torch.manual_seed(0)
    model = CalledTwice().eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
    assert fold_batchnorm(model) == [("block.0", "block.1")]  # raised AssertionError before
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
