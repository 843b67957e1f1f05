"""The fixtures: the one place that starts real servers for the suite, an embedded Kafka-protocol
broker (tansu) and an embedded Redis-protocol server (valkey), once per session on free ports (plus
restartable ones for outage tests), and two thin data fixtures.

Tests isolate themselves by name (a fresh topic, group and key prefix each) rather than by
restarting servers, which keeps the suite fast. Plain helpers (settings for a service under test,
polling, running a service in a thread, producing a stream) are functions in tests/helpers.py:
import them from there, never from this module.
"""

from __future__ import annotations

import gc
import uuid

import pytest

from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
from tests import helpers
from zoo_store.connection import connect


@pytest.fixture(autouse=True)
def _unfrozen_garbage_collector():
    """``filial run``/``watch``/``serve`` freeze their start-up objects (``gc.freeze``); tests call them in
    this process, so what they froze is handed back to the collector after each test."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


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


# --- servers a test may stop and restart (outage tests); never the shared session servers -----------
class PersistentRedis(EmbeddedRedis):
    """Valkey with an append-only file, so a stop/start is an outage, not a wipe (as in production)."""

    def __init__(self, data_dir) -> None:
        super().__init__()
        self.data_dir = data_dir

    def command(self) -> list[str]:
        from daemon.service.embedded import _valkey_binary

        return [_valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no",
                "--dir", str(self.data_dir)]


@pytest.fixture
def restartable_redis(tmp_path):
    with PersistentRedis(tmp_path) as server:
        yield server


@pytest.fixture
def restartable_kafka():
    with EmbeddedKafka() as server:
        yield server


# --- data fixtures (thin: the helpers are plain functions in tests/helpers.py) ------------------------
@pytest.fixture(scope="session")
def digits_tabular():
    """scikit-learn's 8x8 digits as (N, 64) float32 features in [0, 1] and labels."""
    return helpers.digits_tabular()


@pytest.fixture
def produce_tabular():
    """``produce(bootstrap, topic, slice, n, id_prefix, rows=32, permute_seed=None, partition=None, start=0,
    label_shift=0)`` sends ``n`` batches with ids ``{id_prefix}-{i}``; a permuted slice is a strong feature
    shift, a label shift renames the classes (:func:`tests.helpers.produce_tabular`)."""
    return helpers.produce_tabular
