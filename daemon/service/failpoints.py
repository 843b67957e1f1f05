"""Failpoints for ``make chaos`` (tools/chaos.py): an object the service is given, inert by default.

:meth:`Failpoints.from_env` builds the tracing kind when ``FILIAL_CHAOS_TRACE=<file>`` is set: it
appends ``<monotonic> begin|end|at <phase>`` lines around the moments a crash is most dangerous
(``train``: a batch in the engine; ``merge``: planning a merge; ``publish``: writing a version and
adopting it; ``checkpoint``: saving state and committing offsets), so the chaos driver knows which
moment a SIGKILL interrupted. ``FILIAL_CHAOS_PAUSE=<seconds>`` holds each phase open that long at
its riskiest point (after the write, before what follows it) so a kill can land there.
``FILIAL_CHAOS_CRASH_SLICE=<slice>`` makes the process SIGKILL itself when the engine is about to
apply a batch of that slice: a batch that kills the process (as an out-of-memory kill or a native
crash would), for the crash-loop protection's tests and the chaos poison phase. Only the CLI's
composition root reads the environment; production never sets these variables.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Failpoints:
    """No-op markers: the default in production and in tests."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def pause(self, name: str) -> None:
        """The riskiest point inside phase ``name``."""

    def applying(self, slice_name: str) -> None:
        """The engine is about to apply a batch of ``slice_name``."""

    @staticmethod
    def from_env() -> "Failpoints":
        trace = os.environ.get("FILIAL_CHAOS_TRACE")
        crash_slice = os.environ.get("FILIAL_CHAOS_CRASH_SLICE") or None
        if not trace and not crash_slice:
            return Failpoints()
        return TracedFailpoints(Path(trace) if trace else None, float(os.environ.get("FILIAL_CHAOS_PAUSE", "0") or 0),
                                crash_slice)


class TracedFailpoints(Failpoints):
    def __init__(self, trace: Path | None, pause_seconds: float = 0.0, crash_slice: str | None = None) -> None:
        self.trace = trace
        self.pause_seconds = pause_seconds
        self.crash_slice = crash_slice
        self._lock = threading.Lock()

    def applying(self, slice_name: str) -> None:
        if slice_name == self.crash_slice:
            self._write(f"crash {slice_name}")
            os.kill(os.getpid(), signal.SIGKILL)

    def _write(self, line: str) -> None:
        if self.trace is None:
            return
        with self._lock, open(self.trace, "a") as fh:
            fh.write(f"{time.monotonic():.6f} {line}\n")
            fh.flush()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._write(f"begin {name}")
        yield
        self._write(f"end {name}")

    def pause(self, name: str) -> None:
        self._write(f"at {name}")
        if self.pause_seconds:
            time.sleep(self.pause_seconds)
