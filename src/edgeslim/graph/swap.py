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


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{fqn.param: fqn.param of its first owner}`` for every parameter another module
    holds too (a language model's head tied to its embedding, a weight shared by hand)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for fqn, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{fqn}.{pname}" if fqn else pname
            if id(p) in first:
                tied[name] = first[id(p)]
            else:
                first[id(p)] = name
    return tied


def retie(model: nn.Module, ties: Mapping[str, str], params: Mapping[str, nn.Parameter]) -> None:
    """Give every tied name of ``ties`` (from :func:`tied_parameters`, read before modules
    were swapped) its first owner's parameter object ``params[first]`` again, where the
    module now there has a parameter of that name and shape (a swapped-in twin copies its
    weights, which unties them)."""
    for name, first in ties.items():
        shared = params[first]
        for target in (name, first):
            fqn, _, pname = target.rpartition(".")
            module = model.get_submodule(fqn) if fqn else model
            current = module._parameters.get(pname)
            if current is not None and current is not shared and current.shape == shared.shape:
                setattr(module, pname, shared)
