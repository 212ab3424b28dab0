"""Errors of the automated search, each naming the field at fault and what is allowed."""

from __future__ import annotations

from edgeslim.errors import EdgeslimError


class SearchError(EdgeslimError, ValueError):
    """A search request cannot be carried out (bad space, strategy or budget)."""


class PolicyError(SearchError):
    """A policy is malformed or does not fit its search space; the message names the field."""


class ConstraintError(SearchError):
    """A constraint string does not parse, or cannot be checked (e.g. latency with no
    predictor); the message lists the allowed syntax."""


class JournalError(SearchError):
    """A search journal is corrupt, or was written by a different search."""
