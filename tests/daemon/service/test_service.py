"""End to end on the real embedded broker and Redis: batches in → drift → child → merge →
versions out → a follower receives every one; malformed input is dead-lettered; a restart
resumes from the checkpoint without applying anything twice."""

from __future__ import annotations

import json
import threading

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.connection import KafkaConnection
from tools.datasets import load_dataset
from tools.produce import produce_phases
from tools.scenarios import parse_phase
from daemon.cli import main as cli_main
from daemon.learn.fingerprint import decode_fingerprints
from daemon.learn.models import Architecture
from daemon.service.service import Service
from daemon.service.settings import load_settings
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.connection import connect
from zoo_store.follow import Follower
from zoo_store.zoo import ZooFollower


def _settings(kafka, redis_server, unique, **extra):
    return load_settings(kafka_bootstrap=kafka.address, redis_url=redis_server.address, topic=f"{unique}.in",
                         dead_letter_topic=f"{unique}.dlq", group_id=unique, redis_prefix=unique,
                         kafka_session_timeout_ms=6000, bootstrap_batches=4, merge_after_child_updates=4,
                         merge_interval_seconds=600, checkpoint_every_batches=5,
                         merge_tolerance=0.1,  # the path is under test here; the gate has its own tests
                         **extra)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_end_to_end_with_dead_letters_and_restart(kafka, redis_server, unique, mnist, capsys):
    settings = _settings(kafka, redis_server, unique)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})

    service = Service(settings)
    thread = run_in_thread(service)
    follower = Follower(connect(redis_server.address), prefix=unique)
    received, loaded, stop = [], [], threading.Event()

    def watch():
        for event in follower.events(from_version=1, block_ms=100, stop=stop):
            manifest, state = follower.load(event.version)          # raises unless sha256 matches
            Architecture.model_validate(manifest.architecture).build().load_state_dict(state)
            received.append(event.version)
            loaded.append(manifest.weights_sha256 == event.weights_sha256)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    conn = KafkaConnection(bootstrap=kafka.address)
    first = produce_phases(conn, settings.kafka.topic, mnist, [parse_phase("upright=identity")], batch_size=100,
                           samples_per_phase=1000, seed=1)
    producer = KafkaProducer(bootstrap_servers=kafka.address)
    producer.send(settings.kafka.topic, value=b"\x00garbage", headers=[("slice", b"rot90"), ("data_type", b"image"),
                                                                 ("schema", b"1")]).get(timeout=10)
    producer.close()
    second = produce_phases(conn, settings.kafka.topic, mnist, [parse_phase("rot90=rotate:90")], batch_size=100,
                            samples_per_phase=800, seed=2)
    total = first.batches + second.batches
    assert wait_until(lambda: service.engine.counters.batches + service.dead_lettered >= total + 1)
    service.merge_now()
    counters = service.engine.counters
    assert counters.drift_events >= 1 and counters.children_spawned >= 1
    assert counters.merges_accepted >= 1
    versions = service.versions.versions(settings.publish.line)
    assert len(versions) >= 2 and versions == list(range(1, len(versions) + 1))
    assert wait_until(lambda: received == versions, timeout=20), (received, versions)
    assert all(loaded)
    manifest = service.versions.manifest(settings.publish.line, versions[-1])
    assert manifest.reason == "merge" and manifest.base_version == 1 and "rot90" in manifest.metrics
    assert {e.node_id for e in manifest.lineage} >= {"root", "c1"}
    # continual-learning metrics per version: the first learned upright; the last one learned rot90
    # and measures upright's forgetting from the version that learned it
    first_manifest = service.versions.manifest(settings.publish.line, 1)
    assert first_manifest.continual["learned"] == ["upright"] and first_manifest.continual["forgetting"] == {}
    cl = manifest.continual
    assert cl["average_accuracy"] == pytest.approx(sum(manifest.metrics.values()) / len(manifest.metrics), abs=1e-4)
    learned_at = {}
    for v in versions:
        for name in service.versions.manifest(settings.publish.line, v).continual["learned"]:
            learned_at[name] = service.versions.manifest(settings.publish.line, v).metrics[name]
    assert set(learned_at) == {"upright", "rot90"}
    for name, forgetting in cl["forgetting"].items():
        assert forgetting == pytest.approx(learned_at[name] - manifest.metrics[name], abs=1e-4)
    assert cl["bwt"] == (None if cl["average_forgetting"] is None else -cl["average_forgetting"])
    stream = [m for m in service.telemetry.recent_metrics(100) if m.get("event") == "version"]
    assert [m["version"] for m in stream] == versions and stream[-1]["average_accuracy"] == cl["average_accuracy"]

    service.stop()
    thread.join(timeout=60)
    stop.set()
    assert not thread.is_alive()

    # the malformed message is in the dead-letter topic with its reason
    dlq = KafkaConsumer(settings.kafka.dead_letter_topic, bootstrap_servers=kafka.address, auto_offset_reset="earliest",
                        consumer_timeout_ms=5000, group_id=None)
    dead = [m for m in dlq]
    dlq.close()
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["filial-reason"] == b"bad_bytes" and dead[0].value == b"\x00garbage"
    assert headers["filial-source"] == f"{settings.kafka.topic}:0:{first.batches}".encode()

    # every applied offset was committed after the final checkpoint
    probe = KafkaConsumer(bootstrap_servers=kafka.address, group_id=settings.kafka.group_id, enable_auto_commit=False)
    assert probe.committed(TopicPartition(settings.kafka.topic, 0)) == total + 1
    probe.close()

    # a restart restores the checkpoint and applies nothing twice
    again = Service(settings)
    restarted = run_in_thread(again)
    assert wait_until(lambda: again.idle.is_set(), timeout=60)
    again.stop()
    restarted.join(timeout=60)
    assert again.engine.counters.batches == counters.batches
    assert again.engine.served_version == versions[-1]

    # the CLI reads the same state
    capsys.readouterr()
    assert cli_main(["status", "--redis-url", redis_server.address, "--prefix", unique, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in status["lines"]["main"]] == versions
    assert status["lines"]["main"][-1]["continual"] == cl
    assert {n["node_id"] for n in status["tree"]["nodes"]} >= {"root", "c1"}
    assert cli_main(["watch", "--redis-url", redis_server.address, "--prefix", unique, "--load",
                     "--from-version", "1", "--count", str(len(versions))]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["version"] for l in lines] == versions and all(l["loaded"] for l in lines)


def test_a_compact_child_is_a_zoo_member_on_its_own_line_and_followed(kafka, redis_server, unique, produce_tabular,
                                                                  capsys):
    settings = service_settings(kafka.address, redis_server.address, unique, child_size_ratio=0.5,
                                bootstrap_batches=3, bootstrap_accuracy=0.8, accuracy_threshold=0.7)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 8, "plain", rows=128)
        produce_tabular(kafka.address, settings.kafka.topic, "perm", 6, "perm", rows=128, permute_seed=5)
        assert wait_until(lambda: service.engine.counters.batches >= 14)
        service.merge_now()
        child_lines = [line for line in service.versions.lines() if line != settings.publish.line]
        manifests = {line: service.versions.manifest(line, service.versions.latest(line)) for line in child_lines}
        perm_lines = [line for line, m in manifests.items() if "perm" in m.slices]   # a plain batch may spawn too
        assert perm_lines, service.engine.describe_tree()
        line = perm_lines[0]
        manifest = manifests[line]
        assert manifest.parent_line == settings.publish.line and manifest.parent_version >= 1
        assert manifest.architecture["params"]["width"] < 64 and manifest.lineage[-1].node_id == line.split(".")[-1]
        # a zoo member: indexed, announced, with a verified fingerprint of the slice it learned
        zoo = ZooFollower(service.redis, prefix=unique)
        assert zoo.members()[line] == manifest.version and set(zoo.members()) == set(child_lines)
        loaded = zoo.load(line, manifest.version)
        assert loaded.manifest.kind == "member" and "perm" in loaded.manifest.slices
        assert "perm" in decode_fingerprints(loaded.fingerprint, loaded.manifest.fingerprint_slices)
        served = Follower(service.redis, prefix=unique).load_version(service.versions.latest(settings.publish.line))
        assert served.manifest.kind == "served" and "plain" in served.manifest.fingerprint_slices
    finally:
        service.stop()
        thread.join(timeout=60)

    capsys.readouterr()
    assert cli_main(["watch", "--redis-url", redis_server.address, "--prefix", unique, "--line", line, "--load",
                     "--from-version", "1", "--count", "1"]) == 0
    event = json.loads(capsys.readouterr().out.splitlines()[0])
    assert event["line"] == line and event["loaded"]
