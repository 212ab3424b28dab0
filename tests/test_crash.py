"""Crash test: ``edgeslim compress`` killed (SIGKILL) at random points; the next run starts
clean. After every kill the output folder is absent or whole (its manifest verifies), and a
completed next run leaves no temporary sibling behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeslim.artifacts import read_manifest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()
"""
RECIPE = """name: w8a8
stages:
  - kind: quantize
    w_bits: 8
    a_bits: 8
    calibration: 64
"""


def _setup(tmp: Path) -> None:
    (tmp / "crashnet.py").write_text(FACTORY)
    (tmp / "recipe.yaml").write_text(RECIPE)
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 8, 8), dtype=np.float32)
    np.savez(tmp / "data.npz", x=x, y=rng.integers(0, 10, 200))


def _start(tmp: Path, force: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "edgeslim.cli", "compress", "crashnet:build",
           "--recipe", "recipe.yaml", "--data", "data.npz", "--out", "out", "--quick"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    return subprocess.Popen(
        cmd + (["--force"] if force else []), cwd=tmp, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _assert_whole_or_absent(out: Path) -> None:
    if not out.exists():
        return
    manifest = read_manifest(out, verify=True)  # every listed file present with its SHA-256
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(manifest["files"]), "stale or missing files"


def _siblings(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(".out."))


def _kill_during_work(tmp: Path, force: bool, rng: random.Random) -> None:
    """Start a run and SIGKILL it at a random point after it began writing its temporary
    folder (or, if it finishes first, let it be)."""
    proc = _start(tmp, force)
    deadline = time.monotonic() + 120
    while not _siblings(tmp) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 2.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _complete(tmp: Path, force: bool) -> None:
    proc = _start(tmp, force)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _siblings(tmp) == [], "a killed run's temporary folder survived the next run"
    _assert_whole_or_absent(tmp / "out")
    assert (tmp / "out" / "manifest.json").is_file()


def test_a_killed_compress_leaves_nothing_half_written(tmp_path: Path) -> None:
    _setup(tmp_path)
    _kill_during_work(tmp_path, force=False, rng=random.Random(0))
    _assert_whole_or_absent(tmp_path / "out")
    _complete(tmp_path, force=(tmp_path / "out").exists())


@pytest.mark.slow
def test_repeated_kills_never_leave_a_corrupt_or_stale_output(tmp_path: Path) -> None:
    _setup(tmp_path)
    rng = random.Random(14)
    _complete(tmp_path, force=False)
    kills = 6
    for _ in range(kills):
        _kill_during_work(tmp_path, force=True, rng=rng)
        _assert_whole_or_absent(tmp_path / "out")
    _complete(tmp_path, force=True)


BENCH_SCRIPT = """
import os, signal, sys
from pathlib import Path
from edgeslim.bench.records import Record
from edgeslim.bench.suites import register_suite, resumable_steps, run_suite

out = Path(sys.argv[1])
log = out.parent / "steps.log"

def row(step):
    with open(log, "a") as f:
        f.write(step + "\\n")
    if step == "second" and not (out.parent / "killed").exists():
        (out.parent / "killed").write_text("")
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-suite, after "first" finished
    return [Record(suite="crash", model="m", method=f"edgeslim:{step}", metric="top1",
                   value=1.0, baseline_value=1.0, params=1, macs=1, size_bytes=1,
                   latency_ms=None, baseline_latency_ms=None, runtime="torch", seconds=0.0,
                   data_used="none")]

@register_suite("crash")
def crash_suite(out, quick, models):
    steps = [(s, (lambda s: lambda: row(s))(s)) for s in ("first", "second", "third")]
    return resumable_steps("crash", steps, out / "progress.json")

run_suite("crash", out)
"""


def test_a_killed_bench_resumes_without_redoing_finished_steps(tmp_path: Path) -> None:
    """SIGKILL in the middle of a suite; the rerun replays the finished step from its
    progress file and measures only the rest; the finished run leaves no progress file."""
    script = tmp_path / "bench_crash.py"
    script.write_text(BENCH_SCRIPT)
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, str(script), str(out)], capture_output=True)
    assert first.returncode == -signal.SIGKILL
    assert (out / "progress.json").is_file() and not (out / "results.json").exists()
    second = subprocess.run([sys.executable, str(script), str(out)], capture_output=True)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    steps = (tmp_path / "steps.log").read_text().split()
    assert steps == ["first", "second", "second", "third"]  # "first" measured once
    import json

    methods = [r["method"] for r in json.loads((out / "results.json").read_text())]
    assert methods == ["edgeslim:first", "edgeslim:second", "edgeslim:third"]
    assert not (out / "progress.json").exists()
