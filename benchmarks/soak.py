"""``filial bench soak``: many small batches through the whole service; does memory stay flat?

An embedded broker and Redis, a producer thread streaming ``--batches`` tabular batches (scikit-learn
digits, ``--rows`` rows each, with batch ids; the slice changes every ``--phase-batches`` batches
among four feature permutations, so drift, children and merges keep happening), and the real
:class:`daemon.service.service.Service` (consumer group, engine, checkpoints, publisher, merge
scheduler, telemetry) in this process. The process's RSS is sampled every ``--sample-every``
applied batches.

Reported: batches per second, the RSS samples, growth from the first sample to the last, and the
least-squares slope over the second half of the run (MB per 1,000 batches: what a run of weeks
would add once buffers have filled). Bounded by design: replay/held-out buffers per slice, the
tree (``max_children``), the recent batch ids (100,000) and the telemetry streams (``MAXLEN``).
The producer shares the process (its send buffer is bounded at 32 MB by kafka-python).

With ``--poison`` that share of the messages are ones no engine may apply, in turn oversize, incompatible,
non-finite and garbage (``tools.chaos.poison_message``; the message limit is then 64 KiB so an oversize
one stays small): each must be dead-lettered, never applied, and memory must stay flat all the same.
``rss_growth_after_warmup_pct`` is the growth from the first sample at or after ``--warmup`` batches to
the last (issue 11's bound: +5 %).

The last stdout line is one JSON object, also written to ``<out-dir>/soak.json``.
Run: ``python -m benchmarks.soak`` (or ``filial bench soak``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from benchmarks import progress, rss_mb


log = progress("soak")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=20_000, help="batches to stream (default 20000)")
    parser.add_argument("--rows", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--sample-every", type=int, default=1_000, help="RSS sample interval in batches")
    parser.add_argument("--phase-batches", type=int, default=500, help="batches per slice before it changes")
    parser.add_argument("--merge-interval", type=float, default=20.0, help="seconds between scheduled merges")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    parser.add_argument("--poison", type=float, default=0.0, help="share of messages that are poison (e.g. 0.05)")
    parser.add_argument("--warmup", type=int, default=5_000, help="batches before RSS growth is counted")
    parser.add_argument("--out-dir", default="bench-results")


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def _is_poison(i: int, share: float) -> bool:
    """Every ``1/share``-th message (deterministic, so the count of valid batches is known up front)."""
    return share > 0 and int((i + 1) * share) > int(i * share)


def _produce(bootstrap: str, topic: str, n: int, rows: int, phase_batches: int, stop: threading.Event,
             poison: float = 0.0) -> None:
    import torch
    from kafka import KafkaProducer
    from sklearn.datasets import load_digits

    from consumers.wire import encode_batch
    from tools.chaos import POISON_KINDS, poison_message

    bunch = load_digits()
    x = torch.from_numpy(bunch.data).float() / 16.0
    y = torch.from_numpy(bunch.target).long()
    gen = torch.Generator().manual_seed(0)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(3)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
    poisoned = 0
    for i in range(n):
        if stop.is_set():
            break
        phase = (i // phase_batches) % len(perms)
        if _is_poison(i, poison):
            kind = POISON_KINDS[poisoned % len(POISON_KINDS)]
            poisoned += 1
            value, headers = poison_message(kind, f"p{phase}", f"poison-{kind}-{i}", rows, gen)
            producer.send(topic, value=value, headers=headers)
            continue
        lo = (i * rows) % (len(y) - rows)
        value, headers = encode_batch(x[lo:lo + rows][:, perms[phase]].contiguous(), y[lo:lo + rows].contiguous(),
                                      f"p{phase}", "tabular", f"soak-{i}")
        producer.send(topic, value=value, headers=headers)
    producer.flush()
    producer.close(timeout=30)


def _dead_lettered_by_reason(service) -> dict[str, int]:
    return {sample.labels["reason"]: int(sample.value) for metric in service.metrics.decode_failures.collect()
            for sample in metric.samples if sample.name.endswith("_total")}


def _dead_lettered(service) -> int:
    return sum(_dead_lettered_by_reason(service).values())


def main(args: argparse.Namespace) -> dict:
    from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
    from daemon.service.service import Service
    from daemon.service.settings import load_settings

    import logging

    logging.getLogger("filial").setLevel(logging.WARNING)  # one INFO line per batch would dominate the run
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples: list[dict] = []
    started = [0.0]
    done = threading.Event()

    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        name = f"soak{int(time.time())}"
        kafka.create_topics({f"{name}.in": 1, f"{name}.dlq": 1})
        settings = load_settings(
            kafka_bootstrap=kafka.address, redis_url=redis_server.address, topic=f"{name}.in",
            dead_letter_topic=f"{name}.dlq", group_id=name, redis_prefix=name, kafka_session_timeout_ms=6000,
            model_family="tabular_mlp", device="cpu", bootstrap_batches=8, bootstrap_accuracy=0.5,
            merge_interval_seconds=args.merge_interval, checkpoint_every_batches=200, checkpoint_every_seconds=10,
            health_port=0, log_level="WARNING", **({"limits": {"max_message_bytes": 64 * 1024}} if args.poison else {}))
        valid = sum(not _is_poison(i, args.poison) for i in range(args.batches))
        counted = [0]

        def on_result(_result) -> None:
            counted[0] += 1
            n = counted[0]
            if n == 1:
                started[0] = time.monotonic()
            if n % args.sample_every == 0 or n == valid:
                sample = {"batches": n, "rss_mb": round(rss_mb(), 1),
                          "seconds": round(time.monotonic() - started[0], 1)}
                samples.append(sample)
                log(f"{n} batches, RSS {sample['rss_mb']} MB, {sample['seconds']} s")
            if n >= valid:
                done.set()

        service = Service(settings, on_result=on_result)
        stop_producing = threading.Event()
        producer = threading.Thread(target=_produce, args=(kafka.address, settings.kafka.topic, args.batches, args.rows,
                                                           args.phase_batches, stop_producing, args.poison),
                                    daemon=True)
        rss_before = rss_mb()
        runner = threading.Thread(target=service.run, daemon=True)
        runner.start()
        producer.start()
        finished = done.wait(timeout=args.timeout)
        elapsed = time.monotonic() - started[0] if started[0] else 0.0
        deadline = time.monotonic() + 60  # poison sent after the last valid batch is still being dead-lettered
        while _dead_lettered(service) < args.batches - valid and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_producing.set()
        service.stop()
        runner.join(timeout=120)
        counters = service.engine.counters
        published = list(service.published)
        dead_lettered = _dead_lettered_by_reason(service)

    applied = counted[0]
    xs = [s["batches"] / 1000 for s in samples]
    ys = [s["rss_mb"] for s in samples]
    half = len(samples) // 2
    slope_late = _slope(xs[half:], ys[half:])
    warm = next((s["rss_mb"] for s in samples if s["batches"] >= args.warmup), None)
    rate = applied / elapsed if elapsed else None
    result = {
        "batches_requested": args.batches, "batches_applied": applied, "completed": finished,
        "rows_per_batch": args.rows, "seconds": round(elapsed, 1),
        "batches_per_second": round(rate, 1) if rate else None,
        "extrapolated_seconds_for_20000": round(20_000 / rate) if rate else None,
        "rss_before_start_mb": round(rss_before, 1),
        "rss_first_sample_mb": ys[0] if ys else None, "rss_last_sample_mb": ys[-1] if ys else None,
        "rss_growth_mb": round(ys[-1] - ys[0], 1) if ys else None,
        "rss_slope_mb_per_1000_batches_second_half": round(slope_late, 3) if slope_late is not None else None,
        "rss_growth_after_warmup_pct": round(100 * (ys[-1] - warm) / warm, 2) if warm and ys else None,
        "poison_produced": args.batches - valid, "dead_lettered": dead_lettered,
        "samples": samples,
        "children_spawned": counters.children_spawned, "merges_accepted": counters.merges_accepted,
        "merges_rejected": counters.merges_rejected, "versions_published": len(published),
        "duplicates_skipped": counters.duplicates_skipped,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())), flush=True)
