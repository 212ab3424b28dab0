"""Run the CLI on the bad inputs of issue 14 (items 4, 6 and 8) and print a Markdown table of
each case's exit code and the first line of its message.

Why a script: the table in docs/reliability.md must come from real runs, not from memory.
Every case runs ``python -m edgeslim.cli`` in a subprocess on inputs prepared in a fresh
temporary folder (truncated and CRC-damaged copies of the Fashion-MNIST files, a file where a
folder is expected, a factory module that raises, ...); paths in the output are shown as
``$TMP``. With ``--before REF`` the same cases also run on the source of git revision REF
(extracted with ``git archive`` into the temp folder) and the table gets before/after columns.

    .venv/bin/python scripts/reliability_cases.py [--before e55baa1] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RECIPE_OK = "name: w8a8\nstages:\n  - kind: quantize\n    w_bits: 8\n    a_bits: 8\n"
RECIPE_BAD = (
    "name: bad\nstagez: 1\nstages:\n  - kind: quantize\n    w_bits: 12\n    granularity: row\n"
    "  - kind: magic\n"
)
FACTORIES = (
    "import torch\n\n"
    "def build():\n    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())\n\n"
    "def broken():\n    raise ValueError('width must be a multiple of 8')\n\n"
    "NOT_A_FUNCTION = 3\n"
)
FASHION = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass
class Case:
    """One bad input: the issue item it belongs to, the command line, and its set-up."""

    name: str
    item: str
    what: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    interrupt: bool = False  # send SIGINT once the first line is out (or after 8 s)
    first_line_only: bool = False  # stop after the first line; report how long it took


@dataclass
class Result:
    code: int | str
    line: str


def _fashion_dir() -> Path:
    """The installed Fashion-MNIST copy the damaged copies are made from."""
    sys.path.insert(0, str(REPO / "src"))
    from edgeslim.data.fashion_mnist import DEBIAN_DIR

    env = os.environ.get("EDGESLIM_DATA")
    return Path(env) if env else DEBIAN_DIR


def _damaged_copy(src: Path, dst: Path, how: Callable[[bytes], bytes]) -> Path:
    dst.mkdir(parents=True)
    for name in FASHION:
        (dst / name).write_bytes(how((src / name).read_bytes()))
    return dst


def _flip_crc(data: bytes) -> bytes:
    b = bytearray(data)
    b[-6] ^= 0xFF  # the gzip trailer's CRC-32
    return bytes(b)


def _read_only_dir(tmp: Path) -> Path:
    """A location this user cannot write: a 0o555 folder, or /sys for root (which ignores
    permission bits)."""
    if os.geteuid() == 0:
        return Path("/sys/edgeslim-reliability-out")
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


def prepare(tmp: Path) -> list[Case]:
    """Write the inputs into ``tmp`` and return the cases, in the issue's order."""
    fashion = _fashion_dir()
    (tmp / "q.yaml").write_text(RECIPE_OK)
    (tmp / "bad.yaml").write_text(RECIPE_BAD)
    work = tmp / "work"
    work.mkdir()
    (work / "mymodels.py").write_text(FACTORIES)
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "existing-dir").mkdir()
    (tmp / "ckpt-dir").mkdir()
    shutil.copy(REPO / "src/edgeslim/zoo/checkpoints/resnet20.safetensors", tmp / "ckpt-dir")
    run = tmp / "run"
    run.mkdir()
    (run / "results.json").write_text("[]\n")
    (tmp / "empty-data").mkdir()
    cut = _damaged_copy(fashion, tmp / "cut", lambda d: d[: len(d) // 2])
    crc = _damaged_copy(fashion, tmp / "crc", _flip_crc)
    compress = ["compress", "resnet20", "--recipe", str(tmp / "q.yaml"), "--quick"]
    ro = _read_only_dir(tmp)
    return [
        Case("gz-truncated", "4", "truncated .gz IDX files", [*compress, "--out", str(tmp / "o1")],
             {"EDGESLIM_DATA": str(cut)}),
        Case("gz-crc", "4", "IDX .gz files with a bad CRC", [*compress, "--out", str(tmp / "o2")],
             {"EDGESLIM_DATA": str(crc)}),
        Case("data-empty", "4", "EDGESLIM_DATA is an empty folder",
             [*compress, "--out", str(tmp / "o3")], {"EDGESLIM_DATA": str(tmp / "empty-data")}),
        Case("data-missing", "4", "EDGESLIM_DATA is a missing folder",
             [*compress, "--out", str(tmp / "o4")], {"EDGESLIM_DATA": str(tmp / "no-such-dir")}),
        Case("out-file", "6", "`--out` is an existing file",
             [*compress, "--out", str(tmp / "a-file")]),
        Case("export-dir", "6", "`export onnx --out` is an existing folder",
             ["export", "onnx", "resnet20", "--out", str(tmp / "existing-dir")]),
        Case("out-readonly", "6", "`--out` in a read-only location", [*compress, "--out", str(ro)]),
        Case("factory-raises", "6", "a model factory that raises",
             ["info", "mymodels:broken", "--input-shape", "1,1,8,8"]),
        Case("factory-not-callable", "6", "`module:factory` that is not callable",
             ["info", "mymodels:NOT_A_FUNCTION", "--input-shape", "1,1,8,8"]),
        Case("version", "8", "`--version`", ["--version"]),
        Case("recipe-errors", "8", "a recipe with four errors",
             ["compress", "resnet20", "--recipe", str(tmp / "bad.yaml"), "--out", str(tmp / "o5")]),
        Case("ctrl-c", "8", "Ctrl-C during `compress`", [*compress, "--out", str(tmp / "o6")],
             interrupt=True),
        Case("report-twice", "8", "`report A A`",
             ["report", str(run), str(run), "--out", str(tmp / "rep")]),
        Case("ckpt-folder", "8", "a folder as `--checkpoint`",
             ["info", "resnet20", "--checkpoint", str(tmp / "ckpt-dir")]),
        Case("cwd-import", "8", "`module:factory` from the current directory",
             ["info", "mymodels:build", "--input-shape", "1,1,8,8", "--no-groups"]),
        Case("first-line", "8", "`compress`: time to the first printed line",
             [*compress, "--out", str(tmp / "o7")], first_line_only=True),
    ]  # fmt: skip


def _first_line(text: str) -> str:
    for line in ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def run_case(case: Case, src: Path, tmp: Path) -> Result:
    """Run one case on the source tree ``src`` with cwd ``tmp/work``."""
    env = {**os.environ, "PYTHONPATH": str(src), "NO_COLOR": "1", "TERM": "dumb",
           "EDGESLIM_LOG_DIR": str(tmp / "logs"), **case.env}  # fmt: skip
    if "EDGESLIM_DATA" not in case.env:  # the system copy, unless the case names one
        env.pop("EDGESLIM_DATA", None)
    cmd = [sys.executable, "-m", "edgeslim.cli", *case.args]
    start = time.monotonic()
    if not (case.interrupt or case.first_line_only):
        done = subprocess.run(cmd, cwd=tmp / "work", env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        return Result(done.returncode, _message(done.returncode, done.stdout, done.stderr))
    proc = subprocess.Popen(cmd, cwd=tmp / "work", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    seen = threading.Event()
    reader = threading.Thread(target=_first_out, args=(proc, lines, seen), daemon=True)
    reader.start()
    seen.wait(timeout=60)
    elapsed = time.monotonic() - start
    first = lines[0] if lines else ""
    if case.first_line_only:
        proc.kill()
        proc.wait()
        shown = _first_line(first) or "(nothing printed within 60 s)"
        return Result("-", f"after {elapsed:.1f} s: {shown}")
    time.sleep(max(0.0, 10.0 - elapsed))  # let it work a little, then Ctrl-C
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    assert proc.stderr is not None
    err = proc.stderr.read()
    out = "".join(lines)
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("o6", ".o6")))
    said = [ln.strip() for ln in ANSI.sub("", out + err).splitlines() if "interrupted" in ln]
    line = said[0] if said else "(no message)"
    return Result(proc.returncode, f"{line} [left beside --out: {left or 'nothing'}]")


def _first_out(proc: subprocess.Popen[str], lines: list[str], seen: threading.Event) -> None:
    """Collect stdout lines until the process ends; ``seen`` is set at the first non-empty."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() or lines:
            lines.append(line)
            seen.set()


def _message(code: int, out: str, err: str) -> str:
    """The first line of what the user is told: on failure the ``error:`` line (after any
    progress line), else the first line of stderr (a traceback), else of stdout."""
    if code != 0:
        for line in ANSI.sub("", out + "\n" + err).splitlines():
            if line.strip().startswith("error:"):
                return line.strip()
        return _first_line(err) or _first_line(out)
    return _first_line(out) or _first_line(err)


def _cell(text: str, tmp: Path, limit: int = 170) -> str:
    text = text.replace(str(tmp), "$TMP").replace(str(Path.home()), "~")
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _extract(ref: str, dst: Path) -> Path:
    """The ``src`` folder of git revision ``ref``, extracted under ``dst``."""
    archive = dst / "before.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dst / "before", filter="data")
    return dst / "before" / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git revision to run the same cases on (before column)")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeslim-reliability-") as name:
        tmp = Path(name)
        cases = [c for c in prepare(tmp) if not opts.only or c.name in opts.only]
        before_src = _extract(opts.before, tmp) if opts.before else None
        head = "| item | case | exit | first line |"
        rule = "|---|---|---|---|"
        if before_src is not None:
            head = (
                f"| item | case | exit before ({opts.before}) | first line before | exit "
                "| first line |"
            )
            rule = "|---|---|---|---|---|---|"
        print(head)
        print(rule)
        for case in cases:
            cells = [case.item, case.what]
            if before_src is not None:
                b = run_case(case, before_src, tmp)
                cells += [str(b.code), _cell(b.line, tmp)]
                _reset(tmp)
            a = run_case(case, REPO / "src", tmp)
            cells += [str(a.code), _cell(a.line, tmp)]
            _reset(tmp)
            print("| " + " | ".join(cells) + " |", flush=True)


def _reset(tmp: Path) -> None:
    """Remove what a case wrote (outputs o1..o7, rep), so the next run starts from the same
    inputs."""
    for p in [*tmp.glob("o[0-9]*"), *tmp.glob(".o[0-9]*"), tmp / "rep"]:
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
