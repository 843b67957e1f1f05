"""Same stream, same seed, merges triggered by counts: the same versions, bit for bit (CPU)."""

from __future__ import annotations

from daemon.service.service import Service
from tests.helpers import produce_tabular, run_in_thread, service_settings, wait_until


def _versions(kafka, redis_server, name: str, seed: int) -> list[tuple]:
    settings = service_settings(kafka.address, redis_server.address, name, seed=seed, merge_trigger="count",
                                merge_after_child_updates=3, accuracy_threshold=0.9, merge_tolerance=0.5)
    # one partition: the order the daemon reads is the order produced
    produce_tabular(kafka.address, settings.kafka.topic, "plain", 6, "p", partition=0)
    produce_tabular(kafka.address, settings.kafka.topic, "perm", 8, "q", permute_seed=5, partition=0)
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        assert wait_until(lambda: service.engine.counters.batches == 14, timeout=120), service.engine.counters
        assert wait_until(lambda: service.idle.is_set(), timeout=30)
    finally:
        service.stop()
        thread.join(timeout=60)
    line = settings.publish.line
    manifests = [service.versions.manifest(line, v) for v in service.versions.versions(line)]
    return [(m.version, m.reason, m.parent_version, m.weights_sha256, m.metrics) for m in manifests]


def test_same_stream_and_seed_publish_identical_versions(kafka, redis_server, unique):
    first = _versions(kafka, redis_server, unique + "a", seed=7)
    second = _versions(kafka, redis_server, unique + "b", seed=7)
    assert len(first) >= 2, first  # the bootstrap and at least one merge
    assert first == second
    other = _versions(kafka, redis_server, unique + "c", seed=8)
    assert [v[3] for v in other] != [v[3] for v in first]
