"""``filial bench throughput``'s full path: a pre-filled topic through the real service, in this process.

:func:`fill_topic` writes a stream's phases as ``filial produce`` does (:func:`tools.produce.produce_phases`,
the wire format of :func:`consumers.wire.encode_batch`), before any daemon runs. :func:`run_path` starts
the real :class:`daemon.service.service.Service` (consumer group, decode and validation, the ledger,
the engine, checkpoints, publisher, merge job, telemetry) on the embedded broker and Redis, with the
default settings except what the bench must set: topic, servers, group and key prefix (fresh per run,
so each run reads the topic from its start), the health port (any free one), the log level, a 6 s
Kafka session (the embedded broker holds a group's join for half of it; before the clock), and for
``merges="never"`` a merge interval and a child-update count no run reaches. The caller sets torch's
threads (one, as ``bench keep_cost`` and ``bench cl`` run the engine).

The clock runs from the first batch applied to the last (the service's ``on_result``), so the
figures cover batches 2..N: samples/s is their rows over that time; CPU seconds are the process's
(``filial_process_cpu_seconds``) and the merge job's (``filial_merge_cpu_seconds_total``, counted when
a merge finishes) over the same window. Stage seconds are what the ``filial_stage_seconds`` sums grew by
over the same window, per timed batch; ``other`` is the wall time per batch the stages do not cover
(logging, metrics, the ledger, telemetry, the bootstrap publish, waiting for the engine's lock while a
merge takes its snapshot or adopts). Every training call of the learner is recorded for the raw loop
(:mod:`benchmarks.throughput_raw`).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from typing import Any

from benchmarks import progress, rss_mb
from benchmarks.throughput_raw import TrainingRecorder
from daemon.engine.stages import ENGINE_STAGES

SERVICE_STAGES = ("poll", "decode", "checkpoint")
STAGES = (*SERVICE_STAGES, *ENGINE_STAGES)
_log = progress("throughput")


def fill_topic(kafka, topic: str, dataset, phases, batch_size: int, samples_per_phase: int | None) -> dict:
    """Create ``topic`` (one partition) and write the phases into it; returns the producer's report."""
    from consumers.connection import KafkaConnection
    from tools.produce import produce_phases

    kafka.create_topics({topic: 1})
    report = produce_phases(KafkaConnection(bootstrap=kafka.address), topic, dataset, phases,
                            batch_size=batch_size, samples_per_phase=samples_per_phase, run_id=topic)
    return {"batches": report.batches, "samples": report.samples, "per_phase": report.per_phase}


def _sample(service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def run_path(kafka, redis_server, topic: str, batches: int, name: str, merges: str,
             timeout: float = 1800.0) -> tuple[dict[str, Any], TrainingRecorder]:
    """The topic's ``batches`` batches through a fresh service; returns the run's figures and its recorder."""
    from daemon.service.service import Service
    from daemon.service.settings import load_settings

    never = {"merge_interval_seconds": 10.0**9, "merge_after_child_updates": 10**9} if merges == "never" else {}
    kafka.create_topics({f"{name}.dlq": 1})
    settings = load_settings(kafka_bootstrap=kafka.address, redis_url=redis_server.address, topic=topic,
                             dead_letter_topic=f"{name}.dlq", group_id=name, redis_prefix=name, device="cpu",
                             health_port=0, log_level="WARNING", kafka_session_timeout_ms=6000, **never)
    applied, actions, window = [0], Counter(), {}
    rows = [0]
    done = threading.Event()
    recorder = TrainingRecorder()

    def on_result(result) -> None:
        applied[0] += 1
        actions[result.action] += 1
        recorder.next_batch()
        n = applied[0]
        if n > 1:
            rows[0] += result.rows
        if n == 1 or n == batches:
            key = "start" if n == 1 else "end"
            window[key] = {"t": time.perf_counter(), "cpu": _sample(service, "filial_process_cpu_seconds"),
                           "merge_cpu": _sample(service, "filial_merge_cpu_seconds_total"),
                           "stages": {s: _sample(service, "filial_stage_seconds_sum", {"stage": s}) for s in STAGES}}
        if n % 25 == 0:
            _log(f"{name}: {n}/{batches} batches")
        if n >= batches:
            window["rss_mb"] = rss_mb()
            done.set()

    with recorder:
        service = Service(settings, on_result=on_result)
        gc.collect()
        gc.freeze()  # as `filial run` does once set up (why: cmd_run in daemon/cli/__init__.py)
        runner = threading.Thread(target=service.run, name=f"filial-{name}", daemon=True)
        launched = time.perf_counter()
        runner.start()
        finished = done.wait(timeout=timeout)
        stopping = time.perf_counter()
        service.stop(hurry=True)
        runner.join(timeout=600)
        stopped = time.perf_counter()
    if not finished or "end" not in window:
        raise RuntimeError(f"{name}: {applied[0]} of {batches} batches applied within {timeout:.0f} s")
    start, end = window["start"], window["end"]
    seconds = end["t"] - start["t"]
    cpu = end["cpu"] - start["cpu"]
    merge_cpu = end["merge_cpu"] - start["merge_cpu"]
    counters = service.engine.counters
    timed = batches - 1
    per_batch = {s: (end["stages"][s] - start["stages"][s]) / timed for s in STAGES}
    wall_per_batch = seconds / timed
    stages = {s: round(v, 5) for s, v in per_batch.items()}
    stages["other"] = round(wall_per_batch - sum(per_batch.values()), 5)
    return {
        "merges": merges, "batches": batches, "timed_batches": timed, "timed_rows": rows[0],
        "seconds": round(seconds, 3), "samples_per_s": round(rows[0] / seconds, 1),
        "cpu_seconds": round(cpu, 2), "merge_cpu_seconds": round(merge_cpu, 2),
        "merge_cpu_share": round(merge_cpu / cpu, 4) if cpu > 0 else None,
        "cpu_cores_busy": round(cpu / seconds, 2), "rss_mb": round(window["rss_mb"], 1),
        "decisions": dict(actions), "children_spawned": counters.children_spawned,
        "children_retrained": counters.children_retrained, "drift_events": counters.drift_events,
        "merges_accepted": counters.merges_accepted, "merges_rejected": counters.merges_rejected,
        "versions_published": len(service.published), "dead_lettered": service.dead_lettered,
        "seconds_per_batch": round(wall_per_batch, 5), "stages": stages,
        "seconds_to_first_batch": round(start["t"] - launched, 2), "seconds_to_stop": round(stopped - stopping, 2),
    }, recorder
