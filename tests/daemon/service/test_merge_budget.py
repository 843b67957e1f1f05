"""The merge job's CPU budget (merge.cpu_share), on the real embedded broker and Redis."""

from __future__ import annotations

from contextlib import contextmanager

from daemon.service.merge_job import IDLE_SECONDS
from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until


@contextmanager
def _serving_a_then_learning_b(kafka, redis_server, unique, produce_tabular, **settings):
    """A service that published v1 on slice a, then applied 4 batches of a new slice b (so it has
    something to merge); stopped on exit."""
    settings = service_settings(kafka.address, redis_server.address, unique, **settings)
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "a", 3, "a")
        assert wait_until(lambda: service.engine.served_version == 1)
        produce_tabular(kafka.address, settings.kafka.topic, "b", 4, "b", permute_seed=1)
        assert wait_until(lambda: service.engine.counters.batches == 7)
        yield service, settings
    finally:
        service.stop()
        thread.join(timeout=30)


def test_the_merge_job_rests_in_proportion_to_what_a_merge_cost(kafka, redis_server, unique, produce_tabular):
    # a merge of c CPU-seconds rests c (1/share - 1): a million times c, so no rest ends during this test
    # however little a merge cost, and no scheduled tick but this test's own; no confirmation on fresh rows
    # (a held candidate the next batches confirm is published though the job rests: the next test)
    share = 1e-6
    with _serving_a_then_learning_b(kafka, redis_server, unique, produce_tabular, merge_cpu_share=share,
                                    merge_interval_seconds=3600, merge_confirm_alpha=0) as (service, settings):
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

        # the stream pauses: with ingest idle there is no learning to protect, and the tick merges though
        # the job still rests (followers get what was learned without waiting out the rest)
        assert wait_until(lambda: service.health.idle_seconds() >= IDLE_SECONDS, timeout=30)
        assert service.merge_job.resting()
        service.merge_job._scheduled()
        counters = service.engine.counters
        assert counters.merges_accepted + counters.merges_rejected == merges + 1


def test_a_candidate_confirmed_on_fresh_rows_is_published_though_the_job_rests(kafka, redis_server, unique,
                                                                                produce_tabular):
    # merge_alpha 1e-15: a merge of a handful of held-out rows cannot be significant, so it is held for
    # confirmation (merge_confirm_alpha, default 0.05); no nudge or tick but the confirmation's
    with _serving_a_then_learning_b(kafka, redis_server, unique, produce_tabular, merge_cpu_share=1e-6,
                                    merge_alpha=1e-15, merge_after_child_updates=1000,
                                    merge_interval_seconds=3600) as (service, settings):
        held = service.merge_now()
        assert held is not None and held.reason.startswith("gain not significant"), held and held.reason
        assert service.merge_job.resting() and service.engine.served_version == 1
        # the next batches of b are fresh rows for the held candidate: confirmed, and published at once
        produce_tabular(kafka.address, settings.kafka.topic, "b", 3, "b2", permute_seed=1)
        assert wait_until(lambda: service.engine.served_version == 2)
        assert service.merge_job.resting()   # it still rests: the publish computed no merge
        merges = service.telemetry.recent_merges(5)
        confirmed = [m for m in merges if m["reason"].startswith("confirmed on")]
        assert confirmed and confirmed[0]["accepted"], [m["reason"] for m in merges]
        assert confirmed[0]["plan"]["confirmation"]["rejected_as"] == held.reason
        assert service.metrics.registry.get_sample_value("filial_merges_total", {"result": "confirmed"}) == 1


def test_the_end_of_a_burst_is_merged_without_waiting_for_a_tick(kafka, redis_server, unique, produce_tabular):
    # no tick for an hour and no nudge by count: only the idle watch can start this merge
    with _serving_a_then_learning_b(kafka, redis_server, unique, produce_tabular, merge_interval_seconds=3600,
                                    merge_after_child_updates=1000) as (service, settings):
        def attempts() -> int:
            c = service.engine.counters
            return c.merges_accepted + c.merges_rejected

        assert wait_until(lambda: attempts() >= 1, timeout=30)   # once ingest idled IDLE_SECONDS after batch 7
        assert service.health.idle_seconds() >= IDLE_SECONDS
        first = attempts()
        assert wait_until(lambda: service.health.idle_seconds() >= IDLE_SECONDS + 2, timeout=30)
        assert attempts() == first                              # once per idle period, not every look
        produce_tabular(kafka.address, settings.kafka.topic, "b", 2, "b2", permute_seed=1)
        assert wait_until(lambda: attempts() == first + 1, timeout=30)   # the next burst's end: one more
