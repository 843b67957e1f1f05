"""Redis connections with bounded timeouts and capped exponential-backoff retries."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, username: str | None = None, password: str | None = None,
            ssl_ca_file: str | None = None, ssl_cert_file: str | None = None,
            ssl_key_file: str | None = None, socket_timeout: float = 5.0,
            retries: int = 3) -> redis.Redis:
    """Open a client for ``url`` (``redis://`` or ``rediss://`` for TLS).

    Each command retries ``retries`` times on connection errors with backoff capped at 2 s;
    longer outages surface as ``redis.ConnectionError`` to the caller, which decides
    (the service marks itself degraded and retries the whole operation later).
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
        kwargs.update(ssl_ca_certs=ssl_ca_file, ssl_certfile=ssl_cert_file, ssl_keyfile=ssl_key_file)
    return redis.Redis.from_url(url, **kwargs)
