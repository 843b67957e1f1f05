"""The one place that starts real servers for the suite: an embedded Kafka-protocol broker
(tansu) and an embedded Redis-protocol server (valkey), once per session, on free ports.

Tests isolate themselves by name (a fresh topic, group and key prefix each) rather than by
restarting servers, which keeps the suite fast.
"""

from __future__ import annotations

import uuid

import pytest

from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
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


# --- a small tabular stream with batch ids ------------------------------------------------------------
@pytest.fixture(scope="session")
def digits_tabular():
    """scikit-learn's 8x8 digits as (N, 64) float32 features in [0, 1] and labels."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.data).float() / 16.0, torch.from_numpy(bunch.target).long()


@pytest.fixture
def produce_tabular(digits_tabular):
    """``produce(bootstrap, topic, slice, n, id_prefix, rows=32, permute_seed=None, partition=None, start=0)``
    sends ``n`` batches with ids ``{id_prefix}-{i}``; a permuted slice is a strong feature shift."""
    import torch
    from kafka import KafkaProducer

    from consumers.wire import encode_batch

    x_all, y_all = digits_tabular

    def produce(bootstrap: str, topic: str, slice_name: str, n: int, id_prefix: str, rows: int = 32,
                permute_seed: int | None = None, partition: int | None = None, start: int = 0) -> list[str]:
        x = x_all
        if permute_seed is not None:
            x = x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(permute_seed))]
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        ids = []
        for i in range(start, start + n):
            lo = (i * rows) % (len(y_all) - rows)
            batch_id = f"{id_prefix}-{i}"
            value, headers = encode_batch(x[lo:lo + rows].contiguous(), y_all[lo:lo + rows].contiguous(),
                                          slice_name, "tabular", batch_id)
            producer.send(topic, value=value, headers=headers, partition=partition).get(timeout=20)
            ids.append(batch_id)
        producer.close(timeout=10)
        return ids

    return produce


def service_settings(kafka_address: str, redis_address: str, name: str, **extra):
    """Settings for a fast service under test: tabular MLP on CPU, small bootstrap, eager children
    (accuracy threshold 0.99), every merge accepted, frequent checkpoints, health on a free port."""
    from daemon.service.settings import load_settings

    base = dict(kafka_bootstrap=kafka_address, redis_url=redis_address, topic=f"{name}.in",
                dead_letter_topic=f"{name}.dlq", group_id=name, redis_prefix=name, kafka_session_timeout_ms=6000,
                model_family="tabular_mlp", device="cpu", bootstrap_batches=2, bootstrap_epochs=3,
                bootstrap_accuracy=0.01, accuracy_threshold=0.99, merge_after_child_updates=2,
                merge_interval_seconds=600, merge_tolerance=1.0, merge_method="average", merge_level="model",
                checkpoint_every_batches=2, child_epochs=2,
                health_port=0, health_probe_seconds=0.5, backoff_max_seconds=2.0)
    base.update(extra)
    return load_settings(**base)


# --- helpers for tests that run the service in a thread ------------------------------------------------
def wait_until(predicate, timeout: float = 120.0, every: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def run_in_thread(service):
    """Start ``service.run`` in a daemon thread (stop it with ``service.stop()`` and join)."""
    import threading

    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return thread
