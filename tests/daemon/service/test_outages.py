"""Breaking the daemon's dependencies on purpose, on real servers: Redis stopped for 30 s while
versions are being published, and the (memory-only) broker restarted under a running daemon."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.connection import connect
from zoo_store.follow import Follower
from zoo_store.models import Manifest


def _ready(service: Service) -> int:
    if service.health_server is None:
        return 0  # run() has not started it yet
    try:
        with urllib.request.urlopen(service.health_server.url + "/readyz", timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _create_topic(address: str, *names: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=address)
    for name in names:
        try:
            admin.create_topics([NewTopic(name, 1, 1)])
        except TopicAlreadyExistsError:  # a client's metadata request may have auto-created it
            pass
    admin.close()


def test_redis_down_30s_while_publishing_loses_and_doubles_nothing(kafka, restartable_redis, unique,
                                                                   produce_tabular):
    settings = service_settings(kafka.address, restartable_redis.address, unique)
    _create_topic(kafka.address, settings.kafka.topic, settings.kafka.dead_letter_topic)
    service = Service(settings)
    thread = run_in_thread(service)
    follower = Follower(connect(restartable_redis.address), prefix=unique)
    seen, stop = [], threading.Event()

    def follow():  # a downstream follower that lives through the outage (it reconnects by itself)
        for event in follower.events(from_version=1, block_ms=200, stop=stop):
            follower.load(event.version)
            seen.append(event.version)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()

    assert wait_until(lambda: _ready(service) == 200), "not ready"

    restartable_redis.stop()  # before the first version: its publish meets the outage
    down_at = time.monotonic()
    produce_tabular(kafka.address, settings.kafka.topic, "a", 4, "a")
    produce_tabular(kafka.address, settings.kafka.topic, "b", 6, "b", permute_seed=7)
    # ingest goes on, the publish waits in the publisher, and the daemon says it is degraded
    assert wait_until(lambda: service.engine.counters.batches >= 10, timeout=25), service.engine.counters
    assert service.publisher.pending >= 1 and service.published == []
    assert _ready(service) == 503
    time.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
    assert service.publisher.pending >= 1 and _ready(service) == 503
    assert service.metrics.publish_failures.labels("bootstrap")._value.get() >= 1
    restartable_redis.start()

    assert wait_until(lambda: service.publisher.pending == 0 and _ready(service) == 200, timeout=30)
    assert service.published == [1]
    produce_tabular(kafka.address, settings.kafka.topic, "b", 6, "b", permute_seed=7, start=6)
    assert wait_until(lambda: service.engine.counters.batches >= 16, timeout=30)
    service.merge_now()
    service.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()

    store = service.versions
    versions = store.versions(settings.publish.line)
    assert len(versions) >= 1
    assert versions == list(range(1, len(versions) + 1)), versions  # no gap, nothing reused
    assert service.published == versions  # each adopted exactly once
    manifests = [store.manifest(settings.publish.line, v) for v in versions]
    assert len({m.publish_id for m in manifests}) == len(manifests)  # nothing announced twice
    for m in manifests:
        follower.verify(m, store.weights(settings.publish.line, m.version))  # every event has its data
    assert wait_until(lambda: seen == versions, timeout=15), (seen, versions)
    stop.set()
    # the last checkpoint landed after the outage and names the newest version
    meta = json.loads(connect(restartable_redis.address).get(f"{unique}:checkpoint:meta"))
    assert meta["served_version"] == versions[-1]
    assert Manifest.model_validate_json(store.client.get(f"{unique}:line:main:v:{versions[-1]}:manifest"))


def test_broker_restart_resumes_and_the_checkpoint_sees_the_reset(restartable_kafka, redis_server, unique,
                                                                  produce_tabular):
    settings = service_settings(restartable_kafka.address, redis_server.address, unique)
    topic0 = f"{settings.kafka.topic}:0"
    _create_topic(restartable_kafka.address, settings.kafka.topic, settings.kafka.dead_letter_topic)
    service = Service(settings)
    thread = run_in_thread(service)
    produce_tabular(restartable_kafka.address, settings.kafka.topic, "a", 6, "run1", partition=0)
    assert wait_until(lambda: service.engine.counters.batches == 6 and service.ledger.applied_offset(topic0) == 6)
    assert wait_until(lambda: service.checkpointer.batches_since == 0)  # durable

    # 1. the broker restarts under the running daemon: memory-only, so topics and group offsets are gone
    restartable_kafka.restart()
    assert wait_until(lambda: _ready(service) == 200, timeout=20)
    _create_topic(restartable_kafka.address, settings.kafka.topic, settings.kafka.dead_letter_topic)
    # on rejoining, the daemon finds the log shorter than what it applied: a reset, not progress
    assert wait_until(lambda: service.metrics.log_resets.labels(topic0)._value.get() >= 1, timeout=90)
    produce_tabular(restartable_kafka.address, settings.kafka.topic, "a", 3, "run2", partition=0)
    assert wait_until(lambda: service.engine.counters.batches == 9, timeout=60), service.engine.counters
    # the ledger marks a batch applied just after the engine counts it
    assert wait_until(lambda: service.ledger.applied_offset(topic0) == 3, timeout=10) and thread.is_alive()
    service.stop()
    thread.join(timeout=60)

    # 2. the broker restarts while the daemon is down and is refilled past the checkpoint's offset (3):
    # only the batch ids tell the new log from the old one; old ids are replays
    restartable_kafka.restart()
    _create_topic(restartable_kafka.address, settings.kafka.topic, settings.kafka.dead_letter_topic)
    produce_tabular(restartable_kafka.address, settings.kafka.topic, "a", 8, "run3", partition=0)
    produce_tabular(restartable_kafka.address, settings.kafka.topic, "a", 2, "run1", partition=0)
    again = Service(settings)
    thread = run_in_thread(again)
    assert wait_until(lambda: again.engine.counters.batches == 17 and again.engine.counters.duplicates_skipped == 2,
                 timeout=90), again.engine.counters
    assert again.metrics.log_resets.labels(topic0)._value.get() == 1
    again.stop()
    thread.join(timeout=60)
    assert again.ledger.applied_offset(topic0) == 10
    assert all(again.ledger.knows_batch(topic0, f"run3-{i}") for i in range(8))


def test_restart_serves_versions_written_after_the_last_checkpoint(redis_server, unique, digits_tabular):
    """A crash between writing a version and checkpointing it: the restarted daemon serves that version
    (bootstrap, then merge) instead of re-deriving the state and leaving the written one orphaned."""
    import torch
    from safetensors.torch import save as st_save

    from consumers.wire import Batch

    x, y = digits_tabular
    settings = service_settings("127.0.0.1:1", redis_server.address, unique, bootstrap_batches=4)
    first = Service(settings)  # never runs: fed directly, then "crashes" after its checkpoint
    for i in range(2):
        first.engine.process(Batch(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32], "a", "tabular", f"b{i}"))
    first.checkpoints.save(*first.engine.checkpoint())
    arch = first.engine.architecture.model_dump()

    def write(version_state, reason, parent):  # what the crashed daemon had written after its checkpoint
        weights = st_save({k: v.contiguous() for k, v in version_state.items()})
        return first.versions.publish(settings.publish.line, weights, publish_id=f"{reason}:{parent}:{hash(weights)}",
                                      reason=reason,
                                      architecture=arch, parent_version=parent).manifest.version

    boot = {k: v + 0.5 for k, v in first.engine.served_state().items()}
    assert write(boot, "bootstrap", None) == 1
    second = Service(settings)
    second.restore()
    assert second.engine.served_version == 1 and second.checkpointer.adoptions == 1
    assert all(torch.equal(second.engine.served_state()[k], v) for k, v in boot.items())
    second.checkpoints.save(*second.engine.checkpoint())

    merged = {k: v * 0.5 for k, v in boot.items()}
    assert write(merged, "merge", 1) == 2
    third = Service(settings)
    third.restore()
    assert third.engine.served_version == 2
    assert all(torch.equal(third.engine.served_state()[k], v) for k, v in merged.items())
    # the chain stops at a version that does not continue the served one: v3's parent is v1, not v2
    assert write({k: v - 1 for k, v in merged.items()}, "merge", 1) == 3
    fourth = Service(settings)  # restores the checkpoint that serves v1
    fourth.restore()
    assert fourth.engine.served_version == 2 and fourth.checkpointer.adoptions == 1
