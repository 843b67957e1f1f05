"""SIGTERM/SIGINT → a service stop, with nothing done inside the signal handler.

Why: a Python signal handler runs in the main thread between two bytecodes, possibly while that
thread holds a lock; a handler that takes a lock (``Event.set`` takes its Condition's) deadlocks
when a second signal arrives while the first handler holds it (seen: two SIGTERMs hung the daemon).
So the handler is a no-op, and the signal number reaches the process through the interpreter's
wakeup fd (``signal.set_wakeup_fd``: written by the C-level handler, no Python code, no lock);
a watcher thread reads it and calls ``on_signal`` with how many stop signals came so far. The
watcher also acts while the main thread is blocked in C code, where a Python handler would wait.

The first signal asks for a stop; a second asks for a faster one (Service.stop(hurry=True):
README, "What happens when something fails"); further ones only log.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger("filial.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(_signum: int, _frame: object) -> None:
    """The Python-level handler: nothing (the watcher thread acts on the wakeup fd)."""


class StopSignals:
    """``with StopSignals(on_signal):`` routes SIGTERM/SIGINT to ``on_signal(signum, count)`` on a
    watcher thread; the handlers and wakeup fd in place before are restored on exit, or, with
    ``ignore_after``, the signals are ignored from then on (the process is ending: a late stop signal
    must not kill it mid-teardown, or turn a clean exit into -15). Main thread only."""

    def __init__(self, on_signal: Callable[[signal.Signals, int], None],
                 signals: tuple[signal.Signals, ...] = STOP_SIGNALS, ignore_after: bool = False) -> None:
        self.on_signal = on_signal
        self.signals = signals
        self.ignore_after = ignore_after
        self.received = 0
        self._previous_handlers: dict[int, object] = {}
        self._previous_fd = -1
        self._read_fd = self._write_fd = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> "StopSignals":
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # set_wakeup_fd requires it: a full pipe drops, never blocks
        self._watcher = threading.Thread(target=self._watch, name="filial-signals", daemon=True)
        self._watcher.start()
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, _ignore)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_IGN if self.ignore_after else handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        os.close(self._read_fd)

    def _watch(self) -> None:
        wanted = {int(s) for s in self.signals}
        while True:
            data = os.read(self._read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum not in wanted:
                    continue  # another signal with a Python handler also writes its number here
                self.received += 1
                try:
                    self.on_signal(signal.Signals(signum), self.received)
                except Exception:  # the watcher must outlive a failing callback, or later signals go unheard
                    log.exception("acting on %s", signal.Signals(signum).name)


def stop_service_on_signals(service, ignore_after: bool = False) -> StopSignals:
    """The daemon's wiring: first signal → ``service.stop()``, second → ``service.stop(hurry=True)``.
    ``ignore_after``: for a process that only exits once the service has stopped (``filial run``)."""

    def on_signal(signum: signal.Signals, count: int) -> None:
        if count == 1:
            log.info("received %s: finishing the batch in hand, then stopping", signum.name)
            service.stop()
        elif count == 2:
            log.warning("received %s again: stopping faster (queued publishes are not waited for; the last "
                        "checkpoint is still written)", signum.name)
            service.stop(hurry=True)
        else:
            log.warning("received %s (%d): already stopping as fast as is safe; SIGKILL skips the last "
                        "checkpoint (the previous one and the ledger still prevent loss)", signum.name, count)

    return StopSignals(on_signal, ignore_after=ignore_after)
