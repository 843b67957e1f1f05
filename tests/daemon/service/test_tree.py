"""``{p}:tree`` follows the engine between publishes, and an evicted slice's metric labels go."""

from __future__ import annotations

from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.keys import Keys
from zoo_store.telemetry import Telemetry


def test_the_tree_in_redis_follows_spawns_and_retrains_without_a_publish(kafka, redis_server, redis_client, unique,
                                                                         produce_tabular):
    # no merge is ever due (count nor clock): the only version is the bootstrap's
    # only children learn, so the drifted slice spawns a child and then retrains it
    settings = service_settings(kafka.address, redis_server.address, unique, merge_after_child_updates=1000,
                                train_served=False, max_slices=2)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    telemetry = Telemetry(redis_client, Keys(unique))
    service = Service(settings)
    thread = run_in_thread(service)

    def stored_children():
        tree = telemetry.tree() or {"nodes": []}
        return {n["node_id"]: n["updates"] for n in tree["nodes"] if n["node_id"] != "root"}

    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 3, "plain", rows=64)
        produce_tabular(kafka.address, settings.kafka.topic, "perm", 4, "perm", rows=64, permute_seed=5)
        assert wait_until(lambda: service.engine.counters.batches >= 7)
        live = {n["node_id"]: n["updates"] for n in service.engine.describe_tree()["nodes"] if n["node_id"] != "root"}
        assert live and sum(live.values()) >= 2, live  # a child spawned and was trained again
        assert wait_until(lambda: stored_children() == live, timeout=20), (stored_children(), live)
        assert service.published == [1]  # the bootstrap only: the tree was written by the batches

        assert 'slice="plain"' in service.metrics.exposition().decode()
        produce_tabular(kafka.address, settings.kafka.topic, "perm2", 1, "perm2", rows=64, permute_seed=9)
        assert wait_until(lambda: service.engine.counters.batches >= 8)

        def evicted_from_metrics() -> bool:  # the loop drops the labels just after the engine applied the batch
            exposition = service.metrics.exposition().decode()
            return 'slice="plain"' not in exposition and 'slice="perm2"' in exposition

        assert wait_until(evicted_from_metrics, timeout=20), service.metrics.exposition().decode()
        assert 'filial_slices_dropped_total{reason="evicted"} 1.0' in service.metrics.exposition().decode()
    finally:
        service.stop()
        thread.join(timeout=60)
