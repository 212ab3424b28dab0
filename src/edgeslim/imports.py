"""``package.module:name`` references (a model factory, a task, a metric), resolved once.

The current directory is importable, as it is for ``python -m``, so a user's
``mymodels.py`` next to where they run ``edgeslim`` works without setting PYTHONPATH.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from edgeslim.errors import EdgeslimError


def load_callable(spec: str, what: str, error: type[EdgeslimError]) -> Callable[..., Any]:
    """The callable ``spec`` names; ``error`` (with a one-paragraph hint) when it cannot be.

    ``what`` completes "Give `package.module:function` where the module is importable and
    ...", e.g. ``"function() returns an edgeslim.Task"``.
    """
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise error(
            f"cannot load {spec!r}: {exc}. Give `package.module:function` where the module is "
            f"importable (the current directory or PYTHONPATH) and {what}."
        ) from None
    if not callable(obj):
        raise error(f"{spec} is a {type(obj).__name__}, not a function; {what}.")
    return obj
