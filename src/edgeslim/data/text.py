"""A small English corpus for MiniLM calibration and evaluation.

Taken from Debian's ``fortunes`` files when installed (``fortunes-min``), otherwise from
the sentences shipped with edgeslim (``sentences.txt``). Both are real human text.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes"))
FORTUNE_FILES = ("fortunes", "literature", "riddles", "people", "science", "wisdom")


def _fortunes() -> list[str]:
    out: list[str] = []
    for d in FORTUNE_DIRS:
        for name in FORTUNE_FILES:
            path = d / name
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for entry in text.split("\n%\n"):
                line = re.sub(r"\s+", " ", entry).strip()
                if 20 <= len(line) <= 400:
                    out.append(line)
        if out:
            break
    return out


def shipped_sentences() -> list[str]:
    """The sentences that ship inside the package (always available)."""
    text = resources.files("edgeslim.data").joinpath("sentences.txt").read_text("utf-8")
    return [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]


def load_sentences(limit: int | None = None, source: str = "auto") -> list[str]:
    """Return up to ``limit`` sentences, in a fixed order.

    ``source`` is ``auto`` (fortunes if installed, else shipped), ``fortunes`` or ``shipped``.
    """
    if source not in ("auto", "fortunes", "shipped"):
        raise ValueError(f"source must be auto, fortunes or shipped; got {source!r}")
    sentences: list[str] = []
    if source in ("auto", "fortunes"):
        sentences = _fortunes()
        if not sentences and source == "fortunes":
            from edgeslim.errors import DataNotFoundError

            raise DataNotFoundError(
                "Debian fortunes were not found. Install them with "
                "`sudo apt-get install fortunes-min`, or use source='shipped'."
            )
    if not sentences:
        sentences = shipped_sentences()
    return sentences[:limit] if limit is not None else sentences
