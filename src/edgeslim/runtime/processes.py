"""Other processes on this machine: whether one still runs, which this process started, and
waiting for them to exit (Linux ``/proc`` where it tells more than ``kill(pid, 0)``).

Why here: a stale output folder is judged by whether its writer still runs
(:mod:`edgeslim.artifacts`), and a parallel executor's workers must be gone before
anything is timed (:mod:`edgeslim.search.ray_executor`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then the
    parent's pid), or None where there is no such file."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process does; one that exited but is not reaped
    yet does not: it holds no CPU and writes nothing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    fields = _stat(pid)
    return fields is None or fields[0] != "Z"  # Z: exited, not reaped yet


def children() -> list[int]:
    """This process's running child processes, from ``/proc``; empty where there is none."""
    me, out = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        fields = _stat(name) if name.isdigit() else None
        if fields is not None and int(fields[1]) == me and fields[0] != "Z":
            out.append(int(name))
    return out


def wait_exited(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until every process of ``pids`` (this one aside) has exited, at most
    ``timeout`` seconds; the ones still running then."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if p != os.getpid()]
    while True:
        left = [p for p in left if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)
