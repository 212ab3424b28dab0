"""Feature taps: forward hooks that keep a module's latest output, keyed by its FQN.

A distillation loss reads the student's features from the forward the training loop just
ran (no second student pass) and the teacher's from the same single teacher pass that gives
its logits. An unknown FQN fails at construction, naming the closest module names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from edgeslim.errors import EdgeslimError


class UnknownTapError(EdgeslimError, KeyError):
    """A tap names no module of the model; the message lists the closest FQNs."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TapError(EdgeslimError, RuntimeError):
    """A tap captured nothing, or something that is not a tensor, where the loss needs it."""


def tap_module(model: nn.Module, fqn: str, role: str = "model") -> nn.Module:
    """The submodule ``fqn`` of ``model``, or :class:`UnknownTapError` with close matches."""
    modules = dict(model.named_modules())
    if fqn in modules:
        return modules[fqn]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(fqn, names, n=5, cutoff=0.5)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else f"its modules include: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
    )
    raise UnknownTapError(
        f"unknown {role} tap {fqn!r}: {type(model).__name__} has no module with that FQN; "
        f"{hint} (FQNs as listed by model.named_modules())"
    )


def first_tensor(value: Any) -> torch.Tensor | None:
    """A module output's tensor: itself, or the first tensor of a tuple/list (an LSTM's)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


class Taps:
    """Hooks on ``model``'s modules ``fqns`` keeping each one's latest output (the last call's,
    for a module called twice). ``role`` ("student"/"teacher") only names them in errors."""

    def __init__(self, model: nn.Module, fqns: Iterable[str], role: str = "model") -> None:
        self.role = role
        self.fqns = tuple(dict.fromkeys(fqns))
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        modules = [tap_module(model, fqn, role) for fqn in self.fqns]  # all checked first
        for fqn, module in zip(self.fqns, modules, strict=True):
            self._handles.append(module.register_forward_hook(self._keep(fqn)))

    def _keep(self, fqn: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None:
                raise TapError(
                    f"{self.role} tap {fqn!r} ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not a tensor; tap a module that outputs one"
                )
            self.captured[fqn] = t

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The features captured since the last ``take`` (then forgotten, so a stale feature
        from an earlier batch is never used); :class:`TapError` if a tap did not fire."""
        got, self.captured = self.captured, {}
        missing = [f for f in self.fqns if f not in got]
        if missing:
            raise TapError(
                f"{self.role} tap(s) {', '.join(map(repr, missing))} captured nothing since the "
                f"last loss call: the {self.role} did not run them. Call the loss right after "
                f"the {self.role}'s forward on this batch (the loss reads the features that "
                "forward produced), and check the module is on its forward path"
            )
        return got

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.captured = {}
