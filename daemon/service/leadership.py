"""Whether this learner is the merge leader: it holds the lease in Redis (zoo_store/lease.py).

Only the leader publishes the served line (bootstrap and merges), each publish fenced by its token;
every learner publishes its children to the zoo and adopts the served versions it did not write
(daemon/service/recovery.py). A single learner is the N = 1 case: it takes the lease at its first
publish and keeps it. A thread renews the lease every third of its time to live, so the leader does
not lose it between merges; losing it (a pause past the time to live, Redis away) is logged, and a
publish with the old token is refused by Redis (``Fenced``), never half-written.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

import redis

from daemon.service.metrics import ServiceMetrics
from daemon.service.settings import ClusterSettings
from zoo_store.keys import Keys
from zoo_store.lease import Lease

log = logging.getLogger("filial.service")


@dataclass(frozen=True)
class Claim:
    """This learner may publish the served line; ``token`` fences it (None: unfenced)."""
    token: int | None


class Leadership:
    def __init__(self, client: redis.Redis, keys: Keys, settings: ClusterSettings, metrics: ServiceMetrics) -> None:
        # unique per process: two learners misconfigured with one learner_id still never share the lease
        self.holder = f"{settings.learner_id or 'filial'}@{socket.gethostname()}:{os.getpid()}"
        self.publisher = settings.learner_id or None   # the name versions carry (stable across restarts)
        self.single = not settings.learner_id
        self.lease = Lease(client, keys, self.holder, settings.lease_ttl_seconds)
        self.ttl = settings.lease_ttl_seconds
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="filial-lease", daemon=True)
        self._leading = False

    def claim(self) -> Claim | None:
        """Take or renew the lease now. A :class:`Claim` while this learner may publish the served
        line, else None. Redis unreachable: the last token still claims (Redis checks it when the
        publish is written), and a single learner that never led claims unfenced, as before leases."""
        try:
            token = self.lease.acquire()
        except redis.RedisError as exc:
            log.warning("cannot reach the merge lease (%s)", exc)
            if self._leading:
                return Claim(self.lease.token)
            return Claim(None) if self.single else None
        if (token is not None) != self._leading:
            self._leading = token is not None
            if self._leading:
                log.info("leading: holds the merge lease (fencing token %d)", token)
            else:
                log.warning("not leading: the merge lease is held by %s", self._holder() or "another learner")
        self.metrics.leader.set(1 if token is not None else 0)
        if token is not None:
            self.metrics.lease_token.set(token)
        return Claim(token) if token is not None else None

    def step_down(self, why: str) -> None:
        """Give the lease back while leading (a learner that has nothing to merge from, so another can
        lead); the renewals stop with it. Redis unreachable: it expires after its time to live."""
        if not self._leading:
            return
        self._leading = False
        self.metrics.leader.set(0)
        try:
            self.lease.release()
        except redis.RedisError as exc:
            log.warning("could not give the merge lease back (%s): it expires in %.1fs", exc, self.ttl)
        log.info("not leading: gave the merge lease back (%s)", why)

    def _holder(self) -> str | None:
        try:
            current = self.lease.current()
        except redis.RedisError:
            return None
        return current.holder if current else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._leading:
            try:
                self.lease.release()   # the next leader need not wait out the time to live
            except redis.RedisError:
                pass

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if self._leading:
                self.claim()
