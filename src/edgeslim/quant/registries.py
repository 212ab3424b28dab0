"""Named registries of quantizers, estimators and observers (the quantization plug points)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgeslim.registry import Registry

QUANTIZERS: Registry[Callable[..., Any]] = Registry("quantizer")
ESTIMATORS: Registry[Callable[..., Any]] = Registry("estimator")
OBSERVERS: Registry[Callable[..., Any]] = Registry("observer")


def _load_builtins() -> None:
    import edgeslim.quant.estimators
    import edgeslim.quant.observers
    import edgeslim.quant.quantizers  # noqa: F401


_load_builtins_done = False


def ensure_builtins() -> None:
    global _load_builtins_done
    if not _load_builtins_done:
        _load_builtins_done = True
        _load_builtins()
