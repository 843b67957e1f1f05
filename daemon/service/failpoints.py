"""Markers for ``make chaos`` (tools.chaos): inert unless ``FILIAL_CHAOS_TRACE`` is set.

With ``FILIAL_CHAOS_TRACE=<file>`` the service appends ``<monotonic> begin|end <phase>`` lines
around the moments a crash is most dangerous (``train``: a batch in the engine; ``merge``: planning
a merge; ``publish``: writing a version and adopting it; ``checkpoint``: saving state and
committing offsets), so the chaos driver knows which moment a SIGKILL interrupted.
``FILIAL_CHAOS_PAUSE=<seconds>`` holds each such phase open that long at its riskiest point
(after the write, before what follows it) so a kill can land there. Production never sets them.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_TRACE = os.environ.get("FILIAL_CHAOS_TRACE")
_PAUSE = float(os.environ.get("FILIAL_CHAOS_PAUSE", "0") or 0)
_lock = threading.Lock()


def _write(line: str) -> None:
    with _lock, open(_TRACE, "a") as fh:
        fh.write(f"{time.monotonic():.6f} {line}\n")
        fh.flush()


@contextmanager
def phase(name: str) -> Iterator[None]:
    if not _TRACE:
        yield
        return
    _write(f"begin {name}")
    yield
    _write(f"end {name}")


def pause(name: str) -> None:
    """The riskiest point inside ``name``: marked, and held open for ``FILIAL_CHAOS_PAUSE`` seconds."""
    if _TRACE:
        _write(f"at {name}")
        if _PAUSE:
            time.sleep(_PAUSE)
