"""Error types that carry a one-paragraph message telling the user what to do."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (the type alone without a message): what a
    one-paragraph error quotes of an exception it wraps."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class EdgeslimError(Exception):
    """Base class of every error edgeslim raises on bad input."""


class DataNotFoundError(EdgeslimError, FileNotFoundError):
    """A dataset's files are missing; the message names the command that installs them."""


class DataCorruptError(DataNotFoundError):
    """A dataset file exists but is truncated or corrupt; the message names the file and how
    to reinstall it (a subclass of :class:`DataNotFoundError`: the remedy is the same)."""


class UnknownModelError(EdgeslimError, KeyError):
    """A model name is neither in the zoo nor a ``module:factory`` reference."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TraceError(EdgeslimError):
    """A model cannot be traced; the message names the op and the module path."""


class CheckpointError(EdgeslimError):
    """A checkpoint is corrupt or does not match the model; nothing was loaded."""


class RecipeError(EdgeslimError, ValueError):
    """A recipe is invalid; the message names the field and the allowed values."""


class PruneError(EdgeslimError, ValueError):
    """A pruning request cannot be carried out; the message names the group and why."""


class UnreachableTargetError(PruneError):
    """A MACs target beyond what the prunable groups can remove; ``best`` is the reduction
    they can reach (a prune stage with ``allow_target_miss`` prunes that far instead)."""

    def __init__(self, message: str, best: float) -> None:
        super().__init__(message)
        self.best = best


class PlanError(PruneError):
    """A plan file is malformed or does not fit the model; the model was left untouched."""


class TaskError(EdgeslimError, ValueError):
    """A task's data does not fit the model (or is missing); the message says what to pass."""


class BatchError(TaskError, TypeError):
    """A batch is not what edgeslim reads (a tensor, a tuple of tensors, or an ``(inputs,
    target)`` pair): a ``TypeError`` as before, and a :class:`TaskError` so that a recipe
    stage reports it as the data's fault, not the model's."""


class ExportError(EdgeslimError):
    """ONNX export refused the model; the message names the node and what to change."""


class MetricWarning(UserWarning):
    """The task's metric cannot tell models apart on its held data (agreement on rows whose
    reference decision never varies). Its own category so that a caller who knows (a test
    on random weights) can filter it."""


class Int8SaturationWarning(UserWarning):
    """An int8 file computes differently on this CPU than the model it was made from: its
    kernels saturate 16-bit sums (x86 without VNNI; see ``reduce_range``). Its own category
    so that a caller deploying elsewhere can filter it."""
