"""Consume-loop pause during merges: does ingest stall while a merge is computed and published?

Runs the real service (embedded broker and Redis), streams two MNIST-5k phases (upright, then
rot90 so children are spawned and retrained), and while the consume loop works it runs merges
back to back from another thread, as the scheduler would. Every batch's wall time in the consume
loop (waiting for the engine included) is recorded with when it ran, and so is every merge.

Reported: batch times outside merges (median, p95, max) and for batches that overlapped a merge
(max), the longest gap between two consecutive batches that overlapped a merge, and merge wall
times. The merge combines and evaluates candidates on a snapshot outside the engine lock; only
the snapshot and the adoption of an accepted merge hold it, so the stall should be a fraction of
the merge time. On a 2-core machine the merge thread also competes with training for CPU, which
slows overlapping batches without any lock being held: compare with ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from benchmarks import progress
from consumers.connection import KafkaConnection
from daemon.engine.records import BatchResult
from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
from daemon.service.service import Service
from daemon.service.settings import load_settings
from tools.datasets import load_dataset
from tools.produce import produce_phases
from tools.scenarios import parse_phase


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches-per-phase", type=int, default=25,
                        help="batches of each phase; MNIST-5k holds 50 batches of 100 rows (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--merge-method", default=None, help="pin a merge method (default: the service default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


_log = progress("pause")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k")
    batches: list[tuple[float, float]] = []   # (start, end) of each batch in the consume loop
    merges: list[tuple[float, float, bool]] = []
    lock = threading.Lock()

    def on_result(r: BatchResult) -> None:
        end = time.monotonic()
        with lock:
            batches.append((end - r.seconds, end))

    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        extra = {"merge_method": args.merge_method} if args.merge_method else {}
        settings = load_settings(kafka_bootstrap=kafka.address, redis_url=redis_server.address, topic="pause.in",
                                 kafka_session_timeout_ms=6000, merge_interval_seconds=3600,
                                 merge_after_child_updates=10_000, bootstrap_batches=4, **extra)
        service = Service(settings, on_result=on_result)
        loop = threading.Thread(target=service.run, daemon=True)
        loop.start()
        phases = [parse_phase("upright=identity"), parse_phase("rot90=rotate:90")]
        total = produce_phases(KafkaConnection(bootstrap=kafka.address), settings.kafka.topic, data, phases,
                               batch_size=args.batch_size,
                               samples_per_phase=args.batches_per_phase * args.batch_size, seed=0).batches
        _log(f"produced {total} batches; merging back to back while they are consumed")
        while service.engine.counters.batches < total and loop.is_alive():
            started = time.monotonic()
            outcome = service.merge_now()
            if outcome is None:
                time.sleep(0.05)
                continue
            merges.append((started, time.monotonic(), outcome.accepted))
            _log(f"merge {'accepted' if outcome.accepted else 'rejected'} in {time.monotonic() - started:.2f}s "
                 f"({service.engine.counters.batches}/{total} batches applied)")
        service.stop()
        loop.join(timeout=60)

    def overlaps(b: tuple[float, float]) -> bool:
        return any(b[0] < m_end and m_start < b[1] for m_start, m_end, _ in merges)

    during = [b for b in batches if overlaps(b)]
    outside = [b[1] - b[0] for b in batches if not overlaps(b)]
    gaps = [nxt[1] - prev[1] for prev, nxt in zip(batches, batches[1:]) if overlaps(nxt)]
    merge_times = [end - start for start, end, _ in merges]
    return {
        "bench": "pause", "batches": len(batches), "merges": len(merges),
        "merges_accepted": sum(ok for *_, ok in merges),
        "batch_ms_outside_merges": {"median": _ms(statistics.median(outside)), "p95": _ms(_quantile(outside, 0.95)),
                                    "max": _ms(max(outside))} if outside else None,
        "batch_ms_during_merges": {"max": _ms(max(b[1] - b[0] for b in during)), "count": len(during)}
        if during else None,
        "longest_gap_between_batches_during_merge_ms": _ms(max(gaps)) if gaps else None,
        "merge_ms": {"median": _ms(statistics.median(merge_times)), "max": _ms(max(merge_times))}
        if merge_times else None,
        "torch_threads": torch.get_num_threads(),
    }
