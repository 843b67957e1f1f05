"""Components start in order and stop in reverse, in one place.

A component is anything with ``start()`` and ``stop()``. :class:`Lifecycle` remembers what it
started; :meth:`Lifecycle.stop` stops those in reverse order, and a failure to stop one is logged
and does not keep the others running (as mode/faust services do with their dependencies).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

log = logging.getLogger("filial.service")


class Component(Protocol):
    def start(self) -> object: ...

    def stop(self) -> object: ...


class Hooks:
    """A component from two callables (for clients whose stop is ``close``)."""

    def __init__(self, name: str, start: Callable[[], object] = lambda: None,
                 stop: Callable[[], object] = lambda: None) -> None:
        self.name, self._start, self._stop = name, start, stop

    def start(self) -> None:
        self._start()

    def stop(self) -> None:
        self._stop()

    def __repr__(self) -> str:
        return self.name


class Lifecycle:
    def __init__(self) -> None:
        self._started: list[Component] = []

    def start(self, component: Component) -> None:
        component.start()
        self._started.append(component)

    def stop(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception as exc:  # stopping against a dead dependency: nothing left to lose
                log.warning("stopping %r: %s", component, exc)
