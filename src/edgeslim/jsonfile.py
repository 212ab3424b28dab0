"""Saving and loading the project's small JSON documents (prune plans, search policies).

One place for what every such file needs: parent folders created on save, and on load a
missing file, bytes that are not UTF-8, and a document the parser refuses each reported as
the caller's own error type, prefixed with the path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def save_text(path: Path | str, text: str) -> Path:
    """Write ``text`` plus a newline to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def load_document(
    path: Path | str, what: str, error: type[Exception], parse: Callable[[str], T]
) -> T:
    """``parse(text of path)``; ``error`` (naming ``what`` and the path) when the file is
    missing or not UTF-8, and ``parse``'s own ``error`` re-raised with the path in front."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return parse(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a UTF-8 JSON file ({exc.reason})") from None
    except error as exc:
        raise error(f"{path}: {exc}") from None
