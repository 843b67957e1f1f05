"""End to end: a real daemon learns from a real broker and publishes; `filial serve`'s app follows it and
swaps every version and member in under concurrent requests, with no failed request."""

from __future__ import annotations

import threading

import httpx
from safetensors.torch import save as st_save

from daemon.serve.http import HttpServer, ServeApp
from daemon.serve.loader import ZooLoader
from daemon.serve.predictor import Predictor
from daemon.serve.settings import MODES, load_settings as serve_settings
from daemon.service.service import Service
from tests.helpers import digits_tabular, run_in_thread, service_settings, wait_until
from zoo_store.zoo import ZooFollower


def test_serve_follows_a_learning_daemon_without_a_failed_request(kafka, redis_server, unique, produce_tabular):
    settings = service_settings(kafka.address, redis_server.address, unique, child_size_ratio=0.5,
                                bootstrap_batches=3, bootstrap_accuracy=0.8, accuracy_threshold=0.7)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    service = Service(settings)
    daemon = run_in_thread(service)
    loader = ZooLoader(service.redis, line="main", prefix=unique, block_ms=100)
    app = ServeApp(Predictor(loader), loader, serve_settings(redis_url="redis://unused", prefix=unique))
    loader.start()
    server = HttpServer(app.app).start()
    rows = st_save({"x": digits_tabular()[0][:4].contiguous()})
    stop, failures, seen = threading.Event(), [], set()

    def client(mode: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                reply = http.post(f"{server.url}/predict", content=rows, params={"mode": mode},
                                  headers={"content-type": "application/octet-stream"})
                if reply.status_code == 200:
                    seen.add(reply.json()["version"])
                elif not (reply.status_code == 503 and not seen):   # not ready before the first version: fine
                    failures.append((reply.status_code, reply.text))

    clients = [threading.Thread(target=client, args=(mode,)) for mode in MODES]
    for t in clients:
        t.start()
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 8, "plain", rows=128)
        produce_tabular(kafka.address, settings.kafka.topic, "perm", 6, "perm", rows=128, permute_seed=5)
        assert wait_until(lambda: service.engine.counters.batches >= 14)
        service.merge_now()   # publishes the merge (when the gate takes it) and the children as members
        members = ZooFollower(service.redis, prefix=unique).members()
        assert members, service.engine.describe_tree()
        latest = service.versions.latest("main")
        # the zoo size counts the served model too
        assert wait_until(lambda: (loader.stats().version, loader.stats().zoo_size) == (latest, len(members) + 1),
                          timeout=60), loader.stats()
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
        server.stop()
        loader.stop()
        service.stop()
        daemon.join(timeout=60)
    assert not failures, failures[:3]
    assert seen and seen <= set(service.versions.versions("main")), seen
    assert loader.stats().swaps >= 2 and loader.stats().refusals == 0
