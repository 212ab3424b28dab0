"""The calling thread's flush-denormals mode, read and restored.

Why: the mode is per-thread CPU state (MXCSR FTZ/DAZ on x86) that outlives the call that
set it. ONNX Runtime's ``session.set_denormal_as_zero`` switches it on for the thread that
creates the session and never switches it back, so after one export check every float
computation of the user's process silently flushed tiny values to zero (measured:
``1e-39 * 1.0 == 0.0`` after ``ort_session``). Code that changes the mode restores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_TINY = np.float32(1e-39)  # a float32 denormal: kept as is unless the thread flushes


def flushes_denormals() -> bool:
    """Whether this thread currently flushes denormal floats to zero."""
    return bool(_TINY * np.float32(1.0) == 0.0)


@contextmanager
def denormal_mode(flush: bool | None = None) -> Iterator[None]:
    """Run the block with denormals flushed (``flush=True``), kept (``False``) or as
    they are (``None``), then put this thread's previous mode back."""
    previous = flushes_denormals()
    try:
        if flush is not None:
            torch.set_flush_denormal(flush)
        yield
    finally:
        if flushes_denormals() != previous:
            torch.set_flush_denormal(previous)
