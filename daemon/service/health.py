"""Health and metrics over HTTP (stdlib, one thread per request):

- ``GET /healthz``: 200 while the consume loop is alive (it ticked within ``health_stall_seconds``
  and no message has been in its hands longer), body ``{"status": "ok" | "degraded", ...}``; 503
  when the loop is stuck (the problems name the message and what the loop is doing with it) or
  stopped. An outage of Redis or Kafka is ``degraded``, not dead: the daemon is riding it out,
  restarting it would not help; but a message held past ``health_stall_seconds`` (e.g. a dead
  letter the broker keeps refusing) is a stall whatever the cause, and says so.
- ``GET /readyz``: 200 only when Redis and the broker answer and the loop is consuming; 503 with
  the reasons otherwise (``starting``, ``redis unreachable``, ``kafka unreachable``, ...).
- ``GET /metrics``: Prometheus text format (daemon.service.metrics).

The state is written by the service (its dependency probes and loop ticks) and only read here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("filial.health")


class HealthState:
    def __init__(self, stall_seconds: float = 300.0) -> None:
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._deps: dict[str, str | None] = {"redis": "not probed yet", "kafka": "not probed yet"}
        self._started = False
        self._stopped = False
        self._last_tick: float | None = None
        # the message the loop holds: (topic:partition:offset, taken at, what it is doing with it)
        self._in_hand: tuple[str, float, str] | None = None
        self._pending_since: float | None = None  # when the oldest fetched, unfinished message was fetched
        self._last_busy = time.monotonic()  # when the loop last held a message (start-up counts as busy)

    def dependency(self, name: str, problem: str | None) -> None:
        """Record a probe: ``problem`` None when ``name`` answered."""
        with self._lock:
            before = self._deps.get(name)
            changed = before != problem
            self._deps[name] = problem
        if changed and (problem is not None or before != "not probed yet"):
            if problem is None:
                log.warning("%s is back", name)
            else:
                log.warning("%s unavailable (%s): degraded, retrying with backoff", name, problem)

    def available(self, name: str) -> bool:
        """Whether ``name`` answered its last probe (False before the first one). Cheap: the service
        asks on every batch."""
        with self._lock:
            return self._deps.get(name) is None

    def started(self) -> None:
        with self._lock:
            self._started = True

    def stopped(self) -> None:
        with self._lock:
            self._stopped = True

    def tick(self) -> None:
        with self._lock:
            self._last_tick = time.monotonic()

    def fetched(self, at: float | None) -> None:
        """The oldest message fetched and not yet applied or dead-lettered was fetched ``at``
        (monotonic); None: the loop holds none."""
        with self._lock:
            self._pending_since = at

    def holding(self, where: str, doing: str) -> None:
        """The loop took message ``where`` in hand (or, for the same message, moved on to ``doing``)."""
        with self._lock:
            same = self._in_hand is not None and self._in_hand[0] == where
            self._in_hand = (where, self._in_hand[1] if same else time.monotonic(), doing)

    def released(self) -> None:
        """The message in hand was applied, skipped or dead-lettered."""
        with self._lock:
            self._in_hand = None
            self._last_busy = time.monotonic()

    def idle_seconds(self) -> float:
        """Seconds since the loop last held a message (0 while it holds one): how long ingest has had
        nothing to do."""
        with self._lock:
            return 0.0 if self._in_hand is not None else time.monotonic() - self._last_busy

    def pending_age(self) -> float:
        """Seconds the oldest message fetched but not yet applied or dead-lettered has waited (0: none)."""
        with self._lock:
            return 0.0 if self._pending_since is None else time.monotonic() - self._pending_since

    def _stall(self) -> str | None:
        if self._in_hand is None:
            return None
        where, since, doing = self._in_hand
        held = time.monotonic() - since
        if held < self.stall_seconds:
            return None
        return (f"stalled: message {where} in hand for {held:.0f}s > health_stall_seconds "
                f"{self.stall_seconds:g} ({doing})")

    def problems(self) -> list[str]:
        with self._lock:
            problems = [f"{name} unavailable: {p}" for name, p in sorted(self._deps.items()) if p]
            stall = self._stall()
            if stall:
                problems.insert(0, stall)
            if not self._started:
                problems.insert(0, "starting (restoring the checkpoint, joining the group)")
            if self._stopped:
                problems.insert(0, "stopped")
            return problems

    def alive(self) -> bool:
        with self._lock:
            if self._stopped or self._stall():
                return False
            return self._last_tick is None or time.monotonic() - self._last_tick < self.stall_seconds

    def report(self) -> dict:
        problems = self.problems()
        with self._lock:
            age = None if self._last_tick is None else round(time.monotonic() - self._last_tick, 3)
            in_hand = None if self._in_hand is None else {
                "message": self._in_hand[0], "held_s": round(time.monotonic() - self._in_hand[1], 3),
                "doing": self._in_hand[2]}
        return {"status": "ok" if not problems else "degraded", "problems": problems, "loop_tick_age_s": age,
                "in_hand": in_hand}


class HealthServer:
    """Serve ``state`` and ``exposition()`` on ``host:port`` from a daemon thread (port 0: any free port)."""

    def __init__(self, state: HealthState, exposition: Callable[[], bytes], host: str = "0.0.0.0",
                 port: int = 8080) -> None:
        handler = _handler(state, exposition)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="filial-health", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "HealthServer":
        self._thread.start()
        log.info("health and metrics on %s (/healthz /readyz /metrics)", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(state: HealthState, exposition: Callable[[], bytes]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                report = state.report()
                self._json(200 if state.alive() else 503, report)
            elif path == "/readyz":
                report = state.report()
                self._json(200 if report["status"] == "ok" and state.alive() else 503, report)
            elif path == "/metrics":
                self._send(200, exposition(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": f"no such endpoint {path}; try /healthz /readyz /metrics"})

        def _json(self, code: int, body: dict) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args) -> None:  # probes every few seconds: keep them out of the log
            log.debug("%s " + fmt, self.address_string(), *args)

    return Handler


class DependencyProber:
    """Probes Redis and the broker every ``every`` seconds from its own thread, so health is current
    even while the consume loop trains on a batch."""

    def __init__(self, state: HealthState, probes: dict[str, Callable[[], str | None]], every: float,
                 on_result: Callable[[str, bool], None] = lambda name, up: None) -> None:
        self.state = state
        self.probes = probes  # name -> None when up, else the problem
        self.every = every
        self.on_result = on_result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="filial-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, probe in self.probes.items():
                problem = probe()
                self.state.dependency(name, problem)
                self.on_result(name, problem is None)
            self._stop.wait(self.every)
