"""Zoo models built from the operators real edge models use beyond conv-BN-ReLU.

- :class:`MobileNetV3Small`: torchvision's MobileNetV3-small layout (hardswish, squeeze-excite
  gates with hardsigmoid, 5x5 depthwise convs), strided for 28x28 inputs; module names follow
  torchvision's (``features.i.block.j``, ``block.k.fc1``/``fc2``, ``classifier.0``/``3``).
- :class:`PReLUNet`: a plain PReLU CNN without BatchNorm, as face detectors (MTCNN-style)
  are written: per-channel PReLU slopes, max pools, a PReLU fully connected layer.
- :class:`ConvLSTM`: a sequence model as audio front ends are written: the image's 28 rows
  are 28 time steps of 28 features; Conv1d + BatchNorm over time, an ``nn.LSTM``, the last
  step's hidden state classified.

The two CNNs are sized above 20 MMACs at 1x28x28, the scale where integer kernels, not
per-layer overhead, decide latency.
"""

from __future__ import annotations

import torch
from torch import nn

# (kernel, expanded, out, squeeze-excite, activation, stride): torchvision's MobileNetV3-small
# table strided for 28x28 inputs: 28 (stem, first block) -> 14 -> 7
V3_SMALL_CFG: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, True, "RE", 1),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _act(name: str) -> nn.Module:
    return nn.Hardswish() if name == "HS" else nn.ReLU()


class ConvBNAct(nn.Sequential):
    """conv -> BN -> activation (torchvision's ``Conv2dNormActivation``)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: str = "RE"
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act != "none":
            layers.append(_act(act))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``: a channel gate broadcast over H x W."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * gate


class InvertedResidualSE(nn.Module):
    """expand 1x1 -> depthwise kxk -> optional SE -> project 1x1; residual when shapes match."""

    def __init__(
        self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act="none"))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res_connect else out


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small for 1x28x28 (about 26 MMACs): hardswish, SE, a 1024-wide head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, last: int = 1024) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(in_channels, 16, 3, 1, act="HS")]
        ch = 16
        for kernel, expanded, out, se, act, stride in V3_SMALL_CFG:
            layers.append(InvertedResidualSE(ch, kernel, expanded, out, se, act, stride))
            ch = out
        layers.append(ConvBNAct(ch, 6 * ch, 1, act="HS"))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * ch, last), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(last, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class PReLUNet(nn.Module):
    """conv-PReLU stacks with max pools and no BatchNorm, a PReLU fc (about 25 MMACs)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        widths = (24, 48, 96, 192)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.PReLU(cout)]

        self.features = nn.Sequential(
            *block(in_channels, widths[0]),
            *block(widths[0], widths[1]),
            nn.MaxPool2d(2),
            *block(widths[1], widths[2]),
            nn.MaxPool2d(2),
            *block(widths[2], widths[3]),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(widths[3], 128), nn.PReLU(128))
        self.classifier = nn.Linear(128, num_classes)
        for m in self.modules():  # no BN to rescale activations: start them at unit gain
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.25, mode="fan_in")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(self.fc(x))


class ConvLSTM(nn.Module):
    """Conv1d(28 -> 48, k=3) + BN + ReLU over the 28 rows, LSTM(48 -> 64), linear head."""

    def __init__(self, num_classes: int = 10, features: int = 28, hidden: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, 48, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(48)
        self.rnn = nn.LSTM(48, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = torch.relu(self.bn(self.conv(x.flatten(1, 2))))  # (batch, 48, time)
        out, _ = self.rnn(seq.transpose(1, 2))
        return self.fc(out[:, -1])


def mobilenetv3_small(num_classes: int = 10, in_channels: int = 1) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes=num_classes, in_channels=in_channels)


def prelu_cnn(num_classes: int = 10, in_channels: int = 1) -> PReLUNet:
    return PReLUNet(num_classes=num_classes, in_channels=in_channels)


def conv_lstm(num_classes: int = 10) -> ConvLSTM:
    return ConvLSTM(num_classes=num_classes)
