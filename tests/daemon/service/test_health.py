"""/healthz, /readyz and /metrics of a running service on real servers; /readyz flips when Redis
goes away and comes back; JSON logs are one object per line."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from daemon.service.health import HealthState
from daemon.service.logs import JsonFormatter
from daemon.service.service import Service
from tests.helpers import service_settings, wait_until


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_ready_and_metrics_follow_redis(kafka, restartable_redis, unique, produce_tabular):
    settings = service_settings(kafka.address, restartable_redis.address, unique)
    service = Service(settings)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert wait_until(lambda: service.health_server is not None)
    base = service.health_server.url
    assert _get(base + "/healthz")[0] == 200
    assert wait_until(lambda: _get(base + "/readyz")[0] == 200)

    produce_tabular(kafka.address, settings.kafka.topic, "a", 3, "a")
    assert wait_until(lambda: service.engine.counters.batches == 3)
    status, body = _get(base + "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("filial_batches_total", "filial_samples_total", "filial_consumer_lag", "filial_decode_failures",
                 "filial_prequential_accuracy", "filial_drift_decisions_total", "filial_children",
                 "filial_merges", "filial_publish_seconds", "filial_last_checkpoint_age_seconds",
                 "filial_dependency_up"):
        assert name in text, name
    assert 'filial_batches_total{slice="a"} 3.0' in text
    assert 'filial_samples_total{slice="a"} 96.0' in text
    # the bootstrap publish follows the third batch (on the publisher thread): wait for it, not for luck
    published = 'filial_publish_seconds_count{reason="bootstrap"} 1.0'
    assert wait_until(lambda: published in _get(base + "/metrics")[1].decode(), timeout=30), \
        [line for line in _get(base + "/metrics")[1].decode().splitlines() if "publish" in line]
    text = _get(base + "/metrics")[1].decode()
    assert 'filial_served_accuracy{slice="a"}' in text and "filial_served_average_accuracy" in text
    assert "filial_served_bwt NaN" in text   # one slice, learned by this version: nothing to forget yet
    # where the batches' time went: the service's stages and the engine's, per batch
    assert wait_until(lambda: 'filial_stage_seconds_count{stage="buffers"} 3.0' in _get(base + "/metrics")[1].decode())
    text = _get(base + "/metrics")[1].decode()
    for stage in ("decode", "snapshot", "split"):
        assert f'filial_stage_seconds_count{{stage="{stage}"}} 3.0' in text, stage
    assert 'filial_stage_seconds_count{stage="poll"}' in text and 'filial_stage_seconds_count{stage="bootstrap"}' in text
    cpu = [line for line in text.splitlines() if line.startswith("filial_process_cpu_seconds ")]
    assert cpu and float(cpu[0].split()[1]) > 0 and "filial_merge_cpu_seconds_total" in text

    restartable_redis.stop()
    assert wait_until(lambda: _get(base + "/readyz")[0] == 503, timeout=10)
    status, body = _get(base + "/readyz")
    report = json.loads(body)
    assert report["status"] == "degraded" and any(p.startswith("redis unavailable") for p in report["problems"])
    status, body = _get(base + "/healthz")  # alive, riding the outage out: not a reason to restart it
    assert status == 200 and json.loads(body)["status"] == "degraded"
    assert 'filial_dependency_up{dependency="redis"} 0.0' in _get(base + "/metrics")[1].decode()

    restartable_redis.start()
    assert wait_until(lambda: _get(base + "/readyz")[0] == 200, timeout=10)
    report = json.loads(_get(base + "/readyz")[1])
    assert report["status"] == "ok" and report["problems"] == []
    service.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_json_logs_are_one_object_per_line():
    record = logging.LogRecord("filial.service", logging.WARNING, __file__, 1, "redis unavailable (%s)",
                               ("refused",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    payload = json.loads(line)
    assert payload["level"] == "WARNING" and payload["logger"] == "filial.service"
    assert payload["message"] == "redis unavailable (refused)"


def test_ingest_is_idle_only_while_no_message_is_in_hand():
    health = HealthState()
    health.holding("t:0:1", "decoding")
    time.sleep(0.05)
    assert health.idle_seconds() == 0.0           # a message in hand, however long: busy
    health.released()
    time.sleep(0.05)
    assert 0.04 <= health.idle_seconds() < 5
    health.holding("t:0:2", "applying")
    assert health.idle_seconds() == 0.0
