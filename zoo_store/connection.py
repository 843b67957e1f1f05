"""Redis connections with bounded timeouts, and the capped exponential backoff used around them.

Two layers of retry, on purpose: each command retries a few times inside redis-py (a blip of
well under a second never reaches the caller), and anything longer surfaces as
``redis.ConnectionError`` to the caller, which owns the longer policy (the service marks itself
degraded and retries the whole operation later with :class:`CappedBackoff`).
"""

from __future__ import annotations

import random
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, username: str | None = None, password: str | None = None,
            ssl_ca_file: str | None = None, ssl_cert_file: str | None = None,
            ssl_key_file: str | None = None, socket_timeout: float = 5.0,
            retries: int = 3) -> redis.Redis:
    """Open a client for ``url`` (``redis://``, or ``rediss://`` for TLS).

    ``username``/``password`` authenticate with Redis ACLs (``AUTH username password``); TLS
    verifies the server against ``ssl_ca_file`` (system roots when unset) and presents
    ``ssl_cert_file``/``ssl_key_file`` when the server asks for a client certificate.
    """
    kwargs: dict = dict(
        socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=15,
    )
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if url.startswith("rediss://"):
        kwargs.update(ssl_ca_certs=ssl_ca_file, ssl_certfile=ssl_cert_file, ssl_keyfile=ssl_key_file,
                      ssl_cert_reqs="required")
    return redis.Redis.from_url(url, **kwargs)


def probe_client(client: redis.Redis, timeout: float = 1.0) -> redis.Redis:
    """A twin of ``client`` (same address and credentials) that fails fast: for health checks,
    which must answer "is Redis there now?" without the command retries of the main client."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(ExponentialBackoff(), 0),
                  health_check_interval=0)
    kwargs.pop("retry_on_error", None)
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class, max_connections=2,
                                **kwargs)
    return redis.Redis(connection_pool=pool)


class CappedBackoff:
    """Delays for retrying an operation: base, 2*base, 4*base, ... capped at ``cap``, with ±20%
    jitter so that many workers recovering from the same outage do not retry in lockstep.

    ``ready()`` says whether the next attempt is due (for loops that must not sleep, like the
    consume loop); ``sleep()`` waits for it (for threads that have nothing else to do).
    """

    def __init__(self, base: float = 0.2, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._next_at = 0.0

    def delay(self) -> float:
        if self.failures == 0:
            return 0.0
        raw = min(self.cap, self.base * 2 ** (self.failures - 1))
        return raw * random.uniform(0.8, 1.2)

    def failed(self) -> float:
        """Record a failure; returns the delay before the next attempt."""
        self.failures += 1
        wait = self.delay()
        self._next_at = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self._next_at = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._next_at

    def sleep(self, stop=None) -> None:
        """Wait until the next attempt is due (returns early when ``stop``, an Event, is set)."""
        remaining = self._next_at - time.monotonic()
        if remaining > 0:
            if stop is not None:
                stop.wait(remaining)
            else:
                time.sleep(remaining)
