"""Shared settings of the fuzz tests: a fast profile for `make test`, a long one for
`make fuzz` (``HYPOTHESIS_PROFILE=long``), and a guard that turns a hang into a failure."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz-fast",
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same inputs every run: `make test` stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "fuzz-long",
    max_examples=int(os.environ.get("EDGESLIM_FUZZ_EXAMPLES", "2000")),
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = "fuzz-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "fuzz-fast"
FUZZ = settings.get_profile(PROFILE)
HANG_SECONDS = 20.0


class Hang(Exception):
    """A target ran longer than :data:`HANG_SECONDS` on one input."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise :class:`Hang` if the body runs longer than ``seconds`` (SIGALRM, main thread)."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
