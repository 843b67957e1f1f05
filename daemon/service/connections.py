"""Settings → clients: the Kafka connection, the Redis client, the signing key, a broker probe.

Secrets come from their setting, else from their ``*_file`` setting (Docker/Kubernetes secrets).
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Callable, TypeVar

import redis
from kafka.errors import KafkaError
from pydantic import SecretStr

from consumers.connection import KafkaConnection
from daemon.service.settings import Settings
from zoo_store.connection import CappedBackoff, connect

log = logging.getLogger("filial.service")
T = TypeVar("T")


def secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret from its setting, else from its ``*_file`` setting."""
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read secrets file {file}: {exc.strerror}") from None
    return None


def kafka_connection(s: Settings) -> KafkaConnection:
    k = s.kafka
    password = secret(k.sasl_password, k.sasl_password_file)
    return KafkaConnection(bootstrap=k.bootstrap, security_protocol=k.security_protocol,
                           sasl_mechanism=k.sasl_mechanism, sasl_username=k.sasl_username,
                           sasl_password=SecretStr(password) if password else None, ssl_cafile=k.ssl_cafile,
                           ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile)


def redis_client(s: Settings) -> redis.Redis:
    r = s.redis
    return connect(r.url, username=r.username, password=secret(r.password, r.password_file),
                   ssl_ca_file=str(r.ssl_cafile) if r.ssl_cafile else None,
                   ssl_cert_file=str(r.ssl_certfile) if r.ssl_certfile else None,
                   ssl_key_file=str(r.ssl_keyfile) if r.ssl_keyfile else None)


def signing_key(s: Settings) -> bytes | None:
    key = secret(s.publish.signing_key, s.publish.signing_key_file)
    return key.encode() if key else None


def broker_reachable(bootstrap: str, timeout: float = 1.0) -> str | None:
    """None when any bootstrap server accepts a TCP connection, else why not (a cheap, client-independent
    probe: kafka-python hides connection state and retries internally)."""
    problems = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout):
                return None
        except (OSError, ValueError) as exc:
            problems.append(f"{server}: {exc}")
    return "; ".join(problems)


def kafka_client(what: str, factory: Callable[[], T], stop: threading.Event, backoff_cap: float) -> T | None:
    """Build a Kafka client, retrying with backoff while the broker is unreachable; None if stopped."""
    backoff = CappedBackoff(base=0.5, cap=backoff_cap)
    while not stop.is_set():
        try:
            return factory()
        except KafkaError as exc:
            wait = backoff.failed()
            log.warning("cannot start the %s (%s); retrying in %.1fs", what, exc, wait)
            backoff.sleep(stop)
    return None
