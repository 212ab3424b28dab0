"""How the command line ends: exit codes, one-paragraph messages and crash logs.

Exit codes: 0 success; 2 the user's input or environment is at fault (a bad path, a
read-only folder, an invalid recipe, a model factory that raises), with one paragraph
saying what to do; 1 an internal error (a bug), with a short message and the path of a
log file holding the traceback; 130 interrupted (Ctrl-C), saying what was kept.

The wrapper sits outside typer (``standalone_mode=False``) because typer would turn an
``EOFError`` (a truncated gzip stream, for one) into "Aborted." and print a traceback of
locals for anything else.
"""

from __future__ import annotations

import datetime
import errno
import os
import platform
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import typer

from edgeslim.errors import EdgeslimError, first_line

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 130
LOG_DIR_ENV = "EDGESLIM_LOG_DIR"

# errnos that mean the path or the machine, not edgeslim, is at fault
_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOENT,
    errno.ENAMETOOLONG,
}


def versions() -> str:
    """``edgeslim X (torch Y, onnxruntime Z, Python W)`` from package metadata, without
    importing torch or onnxruntime (so ``--version`` is instant)."""

    def version_of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    from edgeslim import __version__

    return (
        f"edgeslim {__version__} (torch {version_of('torch')}, onnxruntime "
        f"{version_of('onnxruntime')}, Python {platform.python_version()})"
    )


def oserror_message(exc: OSError) -> str | None:
    """One paragraph for a file-system error the user can fix, or None for other errnos."""
    if exc.errno not in _USER_ERRNOS:
        return None
    path = exc.filename if exc.filename is not None else "a path"
    temp = re.match(r"^\.(.+)\.tmp-\d+-", Path(str(path)).name)
    if temp:  # the temporary sibling an atomic write starts with: name the real target
        path = str(Path(str(path)).with_name(temp.group(1)))
    code = exc.errno
    if code in (errno.EEXIST, errno.ENOTDIR):
        return (
            f"{path} is an existing file where a folder is needed (or the path passes through "
            "a file). Give --out a new folder name, or move that file away."
        )
    if code == errno.EISDIR:
        return (
            f"{path} is a folder where a file is needed. Give a file name inside it "
            "(e.g. --out that/folder/model.onnx), or move the folder away."
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied for {path}. Choose a location you can write to (e.g. --out "
            "a folder under your home directory), or change the folder's permissions."
        )
    if code == errno.EROFS:
        return f"{path} is on a read-only file system. Choose a writable location with --out."
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left while writing {path}. Free some space or choose another --out."
    if code == errno.ENAMETOOLONG:
        return f"the path {path} is too long for the file system. Choose a shorter --out."
    return f"{path} does not exist. Check the path (relative paths start at {Path.cwd()})."


def log_dir() -> Path:
    """Where crash logs go: ``$EDGESLIM_LOG_DIR``, else the user cache
    (``$XDG_CACHE_HOME`` or ``~/.cache``)/edgeslim/logs, else the system temp folder."""
    explicit = os.environ.get(LOG_DIR_ENV)
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgeslim" / "logs"


def write_crash_log(exc: BaseException, argv: Sequence[str]) -> Path:
    """Write the traceback, command line and versions to a new log file; return its path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"crash-{stamp}-{os.getpid()}.log"
    text = (
        f"command: edgeslim {' '.join(argv)}\n"
        f"cwd: {Path.cwd()}\n"
        f"versions: {versions()}\n\n"
        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "edgeslim-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    fd, fallback = tempfile.mkstemp(prefix="edgeslim-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(fallback)


def _out_of(argv: Sequence[str]) -> str | None:
    """The ``--out`` value of a command line, if any (for the interrupt message)."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


ATOMIC_COMMANDS = ("compress", "export", "zoo")  # write beside --out, move in when complete


def interrupted_message(argv: Sequence[str]) -> str:
    """What Ctrl-C kept: commands that write into a temporary sibling and move it into place
    when complete leave ``--out`` as it was; the others may have finished some files."""
    out = _out_of(argv)
    target = f"{out}" if out else "the output"
    command = next((a for a in argv if not a.startswith("-")), "")
    if command in ATOMIC_COMMANDS:
        return (
            f"interrupted (Ctrl-C): {target} was left as it was before this run; nothing "
            "half-written was kept (outputs are moved into place only when complete). Run the "
            "same command again to redo it."
        )
    return (
        f"interrupted (Ctrl-C): {target} holds only what was finished before the interrupt. "
        "Run the same command again to redo it."
    )


def internal_message(exc: BaseException, log: Path) -> str:
    return (
        f"internal error ({first_line(exc)[:200]}). This is a bug in edgeslim, not in your "
        f"input; the traceback is in {log}. Please report it with that file."
    )


def run(command: Any, argv: Sequence[str], say: Callable[[str], None]) -> int:
    """Run the CLI on ``argv`` and return its exit code; every failure is one paragraph."""
    try:
        code = command.main(list(argv), prog_name="edgeslim", standalone_mode=False)
    except KeyboardInterrupt:
        say(interrupted_message(argv))
        return EXIT_INTERRUPTED
    except typer.Exit as exc:  # raised outside the command (e.g. an eager option)
        return int(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: typer's own message, exit 2
        _show_usage_error(exc)
        return int(exc.exit_code)
    except typer.Abort as exc:  # EOFError on stdin; edgeslim never prompts
        if isinstance(exc.__cause__, KeyboardInterrupt):
            say(interrupted_message(argv))
            return EXIT_INTERRUPTED
        return _internal(exc.__cause__ or exc, argv, say)
    except EdgeslimError as exc:  # a command that did not catch its own
        say(f"error: {exc}")
        return EXIT_USER
    except OSError as exc:
        msg = oserror_message(exc)
        if msg is None:
            return _internal(exc, argv, say)
        say(f"error: {msg}")
        return EXIT_USER
    except Exception as exc:
        return _internal(exc, argv, say)
    if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
        say(interrupted_message(argv))
    return code if isinstance(code, int) else EXIT_OK


def _show_usage_error(exc: typer.TyperException) -> None:
    """Show a usage error as typer would in standalone mode (a rich box when available)."""
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
    except Exception:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"error: {exc.format_message()}", file=sys.stderr)


def _internal(exc: BaseException, argv: Sequence[str], say: Callable[[str], None]) -> int:
    say(f"error: {internal_message(exc, write_crash_log(exc, argv))}")
    return EXIT_INTERNAL


def main(command: Any, say: Callable[[str], None]) -> None:
    """The console entry point: run on ``sys.argv`` and exit with the code."""
    sys.exit(run(command, sys.argv[1:], say))
