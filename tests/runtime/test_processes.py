"""Process checks: a child is seen while it runs and gone once it exits, reaped or not."""

from __future__ import annotations

import os
import subprocess
import sys

from edgeslim.runtime.processes import alive, children, wait_exited


def test_a_child_is_seen_while_it_runs_and_gone_after() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert alive(child.pid) and child.pid in children()
        assert wait_exited([child.pid], 0.0) == [child.pid]
        child.kill()
        # exited but not reaped (no wait() yet): a zombie counts as gone
        assert wait_exited([child.pid], 10.0) == []
        assert child.pid not in children()
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)
    assert alive(os.getpid()) and wait_exited([os.getpid()], 0.0) == []
