"""Plain helpers for the tests (no fixtures): import them, ``from tests.helpers import ...``.

The fixtures that start real servers (and the data fixtures built on these helpers) are in
tests/conftest.py; everything here is an ordinary function.
"""

from __future__ import annotations

import functools
import threading
import time


# --- a small tabular stream with batch ids ------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits_tabular():
    """scikit-learn's 8x8 digits as (N, 64) float32 features in [0, 1] and labels (loaded once)."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.data).float() / 16.0, torch.from_numpy(bunch.target).long()


def produce_tabular(bootstrap: str, topic: str, slice_name: str, n: int, id_prefix: str, rows: int = 32,
                    permute_seed: int | None = None, partition: int | None = None, start: int = 0,
                    label_shift: int = 0) -> list[str]:
    """Send ``n`` batches of the digits with ids ``{id_prefix}-{i}`` (``i`` from ``start``) and return the
    ids; a permuted slice (``permute_seed``) is a strong feature shift, ``label_shift`` renames every class
    ``c`` to ``c + label_shift`` (mod 10): the same inputs, other labels."""
    import torch
    from kafka import KafkaProducer

    from consumers.wire import encode_batch

    x_all, y_all = digits_tabular()
    x = x_all
    y_all = (y_all + label_shift) % 10
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


# --- the service under test -----------------------------------------------------------------------------
def service_settings(kafka_address: str, redis_address: str, name: str, **extra):
    """Settings for a fast service under test: tabular MLP on CPU, small bootstrap, eager children
    (accuracy threshold 0.99), every merge with a gain accepted, frequent checkpoints, health on a free port."""
    from daemon.service.settings import load_settings

    base = dict(kafka_bootstrap=kafka_address, redis_url=redis_address, topic=f"{name}.in",
                dead_letter_topic=f"{name}.dlq", group_id=name, redis_prefix=name, kafka_session_timeout_ms=6000,
                model_family="tabular_mlp", device="cpu", bootstrap_batches=2, bootstrap_epochs=3,
                bootstrap_accuracy=0.01, accuracy_threshold=0.99, merge_after_child_updates=2,
                merge_interval_seconds=600, merge_tolerance=1.0, merge_alpha=0.5, merge_method="average", merge_level="model",
                checkpoint_every_batches=2, child_epochs=2,
                health_port=0, health_probe_seconds=0.5, backoff_max_seconds=2.0)
    base.update(extra)
    return load_settings(**base)


def wait_until(predicate, timeout: float = 120.0, every: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def run_in_thread(service) -> threading.Thread:
    """Start ``service.run`` in a daemon thread (stop it with ``service.stop()`` and join)."""
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return thread
