"""Imports the built-in loss terms so their configs are registered."""

import edgeslim.distill.attention
import edgeslim.distill.dccd
import edgeslim.distill.feature
import edgeslim.distill.kd  # noqa: F401
