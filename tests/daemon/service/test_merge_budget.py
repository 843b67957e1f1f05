"""The merge job's CPU budget (merge.cpu_share), on the real embedded broker and Redis."""

from __future__ import annotations

from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until


def test_the_merge_job_rests_in_proportion_to_what_a_merge_cost(kafka, redis_server, unique, produce_tabular):
    share = 0.001   # a merge of c CPU-seconds rests 999 c: nothing else merges during this test
    settings = service_settings(kafka.address, redis_server.address, unique, merge_cpu_share=share)
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "a", 3, "a")
        assert wait_until(lambda: service.engine.served_version == 1)
        produce_tabular(kafka.address, settings.kafka.topic, "b", 4, "b", permute_seed=1)
        assert wait_until(lambda: service.engine.counters.batches == 7)
        # a merge the children nudged may still run: its CPU would count in the window below, its rest not
        # (each merge's rest replaces the last); once it ends, its rest holds further nudges back
        assert wait_until(lambda: not service.merge_job._lock.locked())
        cpu = service.metrics.registry.get_sample_value
        before = cpu("filial_merge_cpu_seconds_total")
        service.merge_now()
        used = cpu("filial_merge_cpu_seconds_total") - before
        counters = service.engine.counters
        merges = counters.merges_accepted + counters.merges_rejected
        assert used > 0 and merges >= 1
        rest = service.merge_job.rest_seconds()
        assert used * (1 / share - 1) - 5 < rest <= used * (1 / share - 1)

        # children keep learning and nudge the job: it rests, and so does its scheduled tick
        produce_tabular(kafka.address, settings.kafka.topic, "b", 6, "b2", permute_seed=1)
        assert wait_until(lambda: service.engine.counters.batches == 13)
        service.merge_job._scheduled()
        counters = service.engine.counters
        assert counters.merges_accepted + counters.merges_rejected == merges
        assert service.merge_job.resting()
    finally:
        service.stop()
        thread.join(timeout=30)
