"""Reference models: three small CNNs for 1x28x28 inputs and MiniLM, plus model resolution."""

from edgeslim.zoo.registry import (
    ZOO,
    ZooEntry,
    card_path,
    checkpoint_path,
    load_card,
    load_zoo_model,
    resolve_model,
)

__all__ = [
    "ZOO",
    "ZooEntry",
    "card_path",
    "checkpoint_path",
    "load_card",
    "load_zoo_model",
    "resolve_model",
]
