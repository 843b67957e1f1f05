"""Failpoints for ``make chaos`` (tools/chaos.py): an object the service is given, inert by default.

:meth:`Failpoints.from_env` builds the tracing kind when ``FILIAL_CHAOS_TRACE=<file>`` is set: it
appends ``<monotonic> begin|end|at <phase>`` lines around the moments a crash is most dangerous
(``train``: a batch in the engine; ``merge``: planning a merge; ``publish``: writing a version and
adopting it; ``checkpoint``: saving state and committing offsets), so the chaos driver knows which
moment a SIGKILL interrupted. ``FILIAL_CHAOS_PAUSE=<seconds>`` holds each phase open that long at
its riskiest point (after the write, before what follows it) so a kill can land there. Only the
CLI's composition root reads the environment; production never sets either variable.
"""

from __future__ import annotations

import os
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

    @staticmethod
    def from_env() -> "Failpoints":
        trace = os.environ.get("FILIAL_CHAOS_TRACE")
        if not trace:
            return Failpoints()
        return TracedFailpoints(Path(trace), float(os.environ.get("FILIAL_CHAOS_PAUSE", "0") or 0))


class TracedFailpoints(Failpoints):
    def __init__(self, trace: Path, pause_seconds: float = 0.0) -> None:
        self.trace = trace
        self.pause_seconds = pause_seconds
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
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
