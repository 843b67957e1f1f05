"""A superseded slice through the service: named in the batch's decision record, gone from the
engine, and its metric labels removed while the slice that superseded it keeps its own."""

from __future__ import annotations

from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.keys import Keys
from zoo_store.telemetry import Telemetry


def test_a_relabelling_slice_supersedes_the_old_one_in_records_and_metrics(kafka, redis_server, redis_client, unique,
                                                                           produce_tabular):
    settings = service_settings(kafka.address, redis_server.address, unique, merge_trigger="count")
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    telemetry = Telemetry(redis_client, Keys(unique))
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 12, "plain", rows=64)
        assert wait_until(lambda: service.engine.counters.batches >= 12, timeout=60)
        assert 'slice="plain"' in service.metrics.exposition().decode()
        produce_tabular(kafka.address, settings.kafka.topic, "shifted", 4, "shifted", rows=64, start=12,
                        label_shift=1)
        assert wait_until(lambda: service.engine.counters.batches >= 16, timeout=60)

        def superseded() -> list[dict]:
            return [d for d in telemetry.recent_decisions(40) if d.get("superseded_slice")]

        assert wait_until(lambda: superseded(), timeout=20), telemetry.recent_decisions(40)
        [record] = superseded()
        assert record["slice"] == "shifted" and record["superseded_slice"] == "plain"
        assert "relabels 'plain'" in record["reason"]
        assert not service.engine.knows_slice("plain") and service.engine.knows_slice("shifted")
        exposition = service.metrics.exposition().decode()
        assert 'slice="plain"' not in exposition and 'slice="shifted"' in exposition, exposition
        assert 'filial_slices_dropped_total{reason="superseded"} 1.0' in exposition
    finally:
        service.stop()
        thread.join(timeout=60)
