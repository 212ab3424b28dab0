"""Errors and warnings of the data-free methods (a module of its own: methods raise them and
the package re-exports them, without an import cycle)."""

from __future__ import annotations

from edgeslim.errors import EdgeslimError


class DataFreeError(EdgeslimError, ValueError):
    """An invalid data-free request; the message names the field and the allowed values."""


class NothingToCompressError(DataFreeError):
    """A method found nothing to act on in this model (no equalizable pair, no layer it can
    lower, no channel it can remove); the message names the method and, per layer, why.

    Raised instead of returning the model unchanged, which would pass for a result."""


class DataFreeWarning(UserWarning):
    """A data-free method did less than asked (e.g. removed fewer MACs than the target)."""
