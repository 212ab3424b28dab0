"""The search journal: every result a strategy was told, one JSON line each, on disk.

Line 1 is a header naming the search (model fingerprint, space fingerprint, strategy and
its options, seed, batch, constraints, evaluator); each further line is one told result
(``index``, ``policy``, ``source`` = measured / cached / rejected, ``result``), written,
flushed and fsynced before the strategy hears it. A rerun with the same journal replays
the lines into the strategy in order instead of evaluating again, so ``kill -9`` then rerun
loses at most the evaluation that was running. A line cut short by the kill is dropped
(and cut from the file); a header that differs from the new search is refused, naming the
field, since replaying another search's results would silently mislead the strategy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgeslim.search.errors import JournalError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy

JOURNAL_FORMAT = "edgeslim-search-journal"
JOURNAL_VERSION = 1
SOURCES = ("measured", "cached", "rejected")


@dataclass(frozen=True)
class JournalRecord:
    """One told result as the journal holds it."""

    index: int
    policy: Policy
    source: str
    result: EvalResult

    @property
    def counted(self) -> bool:
        """Whether it spent budget (a fresh measurement)."""
        return self.source == "measured"


def _header_line(header: dict[str, Any]) -> dict[str, Any]:
    return {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **header}


class Journal:
    """An append-only JSONL journal (see the module doc). Open with :meth:`open`."""

    def __init__(self, path: Path, records: list[JournalRecord], fh: IO[str]) -> None:
        self.path = path
        self.records = records
        self._fh = fh

    @classmethod
    def open(cls, path: Path | str, header: dict[str, Any]) -> Journal:
        """Open (or create) ``path`` for the search described by ``header``; the records
        already there are in :attr:`records`."""
        path = Path(path)
        if path.is_dir():
            raise JournalError(f"journal {path} is a folder; give a file path (e.g. search.jsonl)")
        path.parent.mkdir(parents=True, exist_ok=True)
        want = json.loads(json.dumps(_header_line(header)))  # as it reads back
        raw = path.read_bytes() if path.exists() else b""
        cut = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        lines = raw[:cut].decode("utf-8", errors="strict").splitlines() if cut else []
        if not lines:
            fh = path.open("w", encoding="utf-8")
            cls._write(fh, want)
            return cls(path, [], fh)
        got = cls._parse(path, lines[0], 1)
        cls._compare(path, got, want)
        records = [cls._record(path, line, i + 2) for i, line in enumerate(lines[1:])]
        for i, rec in enumerate(records):
            if rec.index != i:
                raise JournalError(
                    f"journal {path}: line {i + 2} holds evaluation #{rec.index}, expected #{i}; "
                    "the file was edited or mixed with another journal"
                )
        if cut < len(raw):
            with path.open("r+b") as f:
                f.truncate(cut)
        return cls(path, records, path.open("a", encoding="utf-8"))

    @staticmethod
    def _parse(path: Path, line: str, number: int) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JournalError(f"journal {path}: line {number} is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise JournalError(f"journal {path}: line {number} is not a JSON object")
        return data

    @staticmethod
    def _compare(path: Path, got: dict[str, Any], want: dict[str, Any]) -> None:
        if got.get("format") != JOURNAL_FORMAT:
            raise JournalError(f"{path} is not an edgeslim search journal (no header line)")
        for key, value in want.items():
            if got.get(key) != value:
                raise JournalError(
                    f"journal {path} was written by a different search: its {key} is "
                    f"{got.get(key)!r}, this search's is {value!r}. A journal resumes only the "
                    "same model, space, strategy (and options), seed, batch, constraints and "
                    "evaluator; give another journal path to start afresh."
                )

    @classmethod
    def _record(cls, path: Path, line: str, number: int) -> JournalRecord:
        data = cls._parse(path, line, number)
        try:
            source = str(data["source"])
            if source not in SOURCES:
                raise ValueError(f"unknown source {source!r}")
            return JournalRecord(
                int(data["index"]),
                Policy.from_dict(data["policy"]),
                source,
                EvalResult.from_dict(data["result"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(
                f"journal {path}: line {number} is not a valid record ({exc})"
            ) from None

    @staticmethod
    def _write(fh: IO[str], data: dict[str, Any]) -> None:
        fh.write(json.dumps(data, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def append(self, index: int, policy: Policy, source: str, result: EvalResult) -> None:
        """Write one told result durably (flushed and fsynced)."""
        record = {"index": index, "policy": policy.to_dict(), "source": source,
                  "result": result.to_dict()}  # fmt: skip
        self._write(self._fh, record)
        self.records.append(JournalRecord(index, policy, source, result))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
