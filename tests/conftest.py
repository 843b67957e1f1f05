"""The one place that starts real servers for the suite: an embedded Kafka-protocol broker
(tansu) and an embedded Redis-protocol server (valkey), once per session, on free ports.

Tests isolate themselves by name (a fresh topic, group and key prefix each) rather than by
restarting servers, which keeps the suite fast.
"""

from __future__ import annotations

import uuid

import pytest

from daemon.embedded import EmbeddedKafka, EmbeddedRedis
from zoo_store.connection import connect


@pytest.fixture(scope="session")
def kafka():
    with EmbeddedKafka() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server.address)
    yield client
    client.close()


@pytest.fixture
def unique():
    """A short unique name for topics, groups and key prefixes."""
    return f"t{uuid.uuid4().hex[:10]}"
