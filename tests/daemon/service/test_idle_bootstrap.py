"""A stream shorter than the bootstrap's minimums, then a pause: its first version is served once
ingest idles (clock trigger), and never by time under the count trigger. Real embedded broker and Redis."""

from __future__ import annotations

from daemon.service.merge_job import IDLE_SECONDS
from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until


def _short_stream(kafka, redis_server, unique, produce_tabular, **settings):
    # 3 batches of 32 rows: under bootstrap_batches (8) and bootstrap_rows (400)
    settings = service_settings(kafka.address, redis_server.address, unique, bootstrap_batches=8,
                                merge_interval_seconds=3600, **settings)
    service = Service(settings)
    thread = run_in_thread(service)
    produce_tabular(kafka.address, settings.kafka.topic, "a", 3, "a")
    assert wait_until(lambda: service.engine.counters.batches == 3)
    return service, thread


def test_a_short_stream_is_served_once_ingest_idles(kafka, redis_server, unique, produce_tabular):
    service, thread = _short_stream(kafka, redis_server, unique, produce_tabular)
    try:
        assert wait_until(lambda: service.engine.served_version == 1, timeout=30)
        assert service.health.idle_seconds() >= IDLE_SECONDS   # the pause published it, not a batch
        assert service.published == [1]
    finally:
        service.stop()
        thread.join(timeout=30)


def test_under_the_count_trigger_a_pause_publishes_nothing(kafka, redis_server, unique, produce_tabular):
    service, thread = _short_stream(kafka, redis_server, unique, produce_tabular, merge_trigger="count")
    try:
        assert wait_until(lambda: service.health.idle_seconds() >= IDLE_SECONDS + 2, timeout=30)
        assert service.engine.served_version is None and service.published == []
    finally:
        service.stop()
        thread.join(timeout=30)
