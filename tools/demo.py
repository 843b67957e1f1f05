"""`filial demo`: the whole path on embedded servers, with a summary JSON as the last line.

embedded tansu + valkey → daemon (service thread) ← producer streams drifting phases of MNIST-5k
→ versions in Redis → a follower thread receives every event and loads verified weights.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import torch

from consumers.connection import KafkaConnection
from daemon.learn.models import Architecture
from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
from daemon.service.service import Service
from daemon.service.settings import load_settings
from tools.datasets import load_dataset
from tools.produce import produce_phases
from tools.scenarios import parse_phase
from zoo_store.connection import connect
from zoo_store.follow import Follower

log = logging.getLogger("filial.demo")

DEFAULT_PHASES = ["upright=identity", "rot90=rotate:90", "noisy=noise:100"]


def say(message: str) -> None:
    log.info("[demo] %s", message)


class Watcher(threading.Thread):
    """A downstream consumer: follows every version, loads it, checks the sha256."""

    def __init__(self, redis_url: str, prefix: str, line: str) -> None:
        super().__init__(name="watcher", daemon=True)
        self.follower = Follower(connect(redis_url), line=line, prefix=prefix)
        self.received: list[int] = []  # each one loaded and sha256-verified
        self.stop_event = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for event in self.follower.events(from_version=1, block_ms=200, stop=self.stop_event):
                manifest, state = self.follower.load(event.version)
                Architecture.model_validate(manifest.architecture).build().load_state_dict(state)
                self.received.append(event.version)
                say(f"watcher received v{event.version} ({event.reason}); sha256 verified, weights loaded")
        except Exception as exc:  # reported in the summary, never swallowed
            self.error = exc
            log.exception("watcher failed")


def run_demo(phases: list[str] | None = None, samples_per_phase: int = 1600, batch_size: int = 100,
             dataset: str = "mnist5k", seed: int = 0) -> dict[str, Any]:
    started = time.monotonic()
    torch.manual_seed(seed)
    parsed = [parse_phase(p) for p in (phases or DEFAULT_PHASES)]
    data = load_dataset(dataset)
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        say(f"embedded broker at {kafka.address}, embedded Redis at {redis_server.address}")
        settings = load_settings(kafka_bootstrap=kafka.address, redis_url=redis_server.address,
                                 kafka_session_timeout_ms=6000, merge_interval_seconds=30,
                                 merge_after_child_updates=6, checkpoint_every_batches=10)
        kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
        service = Service(settings)
        daemon_thread = threading.Thread(target=service.run, name="daemon", daemon=True)
        daemon_thread.start()
        watcher = Watcher(settings.redis.url, settings.redis.prefix, settings.publish.line)
        watcher.start()

        say(f"streaming {len(parsed)} phases of {dataset}: {', '.join(p.name for p in parsed)}")
        last_phase = [""]

        def progress(phase: str, i: int, total: int) -> None:
            if phase != last_phase[0]:
                last_phase[0] = phase
                say(f"phase {phase}: sending {total} batches")

        conn = KafkaConnection(bootstrap=kafka.address)
        report = produce_phases(conn, settings.kafka.topic, data, parsed, batch_size=batch_size,
                                samples_per_phase=samples_per_phase, seed=seed, on_batch=progress)
        _send_malformed(conn, settings.kafka.topic)
        expected = report.batches + 1
        say(f"sent {report.batches} batches and 1 malformed message; waiting for the daemon to apply them")
        deadline = time.monotonic() + 240
        while _consumed(service) < expected and time.monotonic() < deadline and daemon_thread.is_alive():
            time.sleep(0.2)
        say("stream applied; running the final merge")
        service.merge_now()
        final_version = service.versions.latest(settings.publish.line)
        deadline = time.monotonic() + 30
        while (not watcher.received or watcher.received[-1] != final_version) and time.monotonic() < deadline:
            time.sleep(0.1)
        service.stop()
        daemon_thread.join(timeout=60)
        watcher.stop_event.set()
        watcher.join(timeout=10)

        manifest, state = watcher.follower.load(final_version)
        final_accuracy = service.engine.metrics(state)  # the version followers hold, on the held-out rows
        c = service.engine.counters
        summary = {
            "batches": c.batches, "drift_events": c.drift_events, "children_spawned": c.children_spawned,
            "children_retrained": c.children_retrained, "merges_accepted": c.merges_accepted,
            "merges_rejected": c.merges_rejected,
            "versions_published": len(service.published),
            "final_version": final_version, "accuracy": final_accuracy,
            "watcher_received": watcher.received, "dead_lettered": service.dead_lettered,
            "seconds": round(time.monotonic() - started, 1),
        }
        if watcher.error:
            summary["watcher_error"] = str(watcher.error)
        return summary


def _consumed(service: Service) -> int:
    return service.engine.counters.batches + service.dead_lettered


def _send_malformed(conn: KafkaConnection, topic: str) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**conn.client_kwargs())
    producer.send(topic, value=b"not a safetensors payload",
                  headers=[("slice", b"upright"), ("data_type", b"image"), ("schema", b"1")]).get(timeout=30)
    producer.close()


def main() -> None:
    print(json.dumps(run_demo()))
