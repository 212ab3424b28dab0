"""Attributes of a module or class replaced, for the duration of a context or for good.

The tracers (tensor factories given traced sizes, ``torch.tensor`` of fixed sizes) and the
ONNX export (torch exporter bugs and gaps) each replace a few of torch's functions while
they run; one helper sets them and puts the originals back, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def swapped(owner: Any, replacements: Mapping[str, Any]) -> Iterator[None]:
    """``owner.<name> = value`` for each entry while the context lasts; restored after."""
    originals = {name: getattr(owner, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(owner, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(owner, name, value)


def replace_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(fqn)`` is (a ``Sequential``'s index too)."""
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
