"""``package.module:name`` references (a model factory, a task, a metric), resolved once.

The current directory is importable, as it is for ``python -m``, so a user's
``mymodels.py`` next to where they run ``edgeslim`` works without setting PYTHONPATH. A
file path works too, ``path/to/mymodels.py:build``: its folder becomes importable (so the
file's own sibling imports work) and the file is imported as the module ``mymodels``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeslim.errors import EdgeslimError


def load_callable(spec: str, what: str, error: type[EdgeslimError]) -> Callable[..., Any]:
    """The callable ``spec`` names; ``error`` (with a one-paragraph hint) when it cannot be.

    ``what`` completes "Give `package.module:function` where the module is importable and
    ...", e.g. ``"function() returns an edgeslim.Task"``.
    """
    module_name, _, attr = spec.rpartition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    if module_name.endswith(".py"):
        module_name = _module_of_file(spec, Path(module_name), error)
    if not module_name or not attr:
        raise error(
            f"{spec!r} is not a `package.module:function` reference; give the module and the "
            f"function separated by a colon, e.g. mymodels:build, where {what}."
        )
    importlib.invalidate_caches()  # a module file written after start-up is found too
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise error(
            f"cannot load {spec!r}: {exc}. Give `package.module:function` where the module is "
            f"importable (the current directory or PYTHONPATH) and {what}."
        ) from None
    except Exception as exc:  # the user's module failed while importing (SyntaxError, ...)
        raise error(
            f"importing {module_name} (for {spec}) raised {type(exc).__name__}: {exc}. Fix the "
            "module so that it imports cleanly."
        ) from exc
    if not callable(obj):
        raise error(f"{spec} is a {type(obj).__name__}, not a function; {what}.")
    return obj


def _module_of_file(spec: str, path: Path, error: type[EdgeslimError]) -> str:
    """The module name a ``path/to/file.py`` reference imports as, its folder importable."""
    if not path.is_file():
        raise error(f"cannot load {spec!r}: {path} is not a file.")
    folder = str(path.resolve().parent)
    name = path.stem
    loaded = sys.modules.get(name)
    where = getattr(loaded, "__file__", None)
    if loaded is not None and (where is None or Path(where).resolve() != path.resolve()):
        raise error(
            f"cannot load {spec!r}: another module named {name!r} is already imported "
            f"({where or 'built in'}); rename {path.name}."
        )
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return name
