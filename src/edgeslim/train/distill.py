"""Hinton KD moved to :mod:`edgeslim.distill` (with feature, attention and DCCD losses);
``kd_loss`` stays importable from here for existing callers."""

from edgeslim.distill.kd import kd_loss

__all__ = ["kd_loss"]
