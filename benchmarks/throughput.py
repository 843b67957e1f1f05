"""Throughput of the full path (Kafka → decode → learn → publish, merges on schedule) against the raw training loop.

Streams, each pre-filled into its own topic of the embedded broker (``filial produce``'s wire format),
then read by the real service in this process (:mod:`benchmarks.throughput_path`) with one torch
thread (the raw loop runs in the same thread count), twice: merges never, and merges at the default
schedule (every ``merge_interval_seconds``, 60, and nudged after ``merge_after_child_updates``, 8):

- ``drift`` (the headline): MNIST-5k, ``--batches`` batches of ``--rows`` rows in three phases,
  ``upright`` → ``rot90`` → ``permuted`` (pixels permuted, seed 1): keeps, spawns and retrains;
- ``keep``: ``--keep-batches`` batches of upright MNIST only (stationary: after bootstrap, keeps).

Per run, the raw loop (:mod:`benchmarks.throughput_raw`) replays the training calls the daemon made
in that run (same architectures, optimizer steps, mini-batch size, learning rate and row counts, replay
included) in plain torch on in-memory tensors, best of ``--repeats``; ``ratio_to_raw`` = the full path's
samples/s over the raw loop's on the same rows (batches 2..N: the clock starts at the first batch
applied). The raw loop is training only: the ratio is the share of the daemon's time that is training.
It computes in the daemon's precision (bf16 autocast where ``precision`` asked for it), so the ratio
compares the same work; where that is bf16, the same calls in float32 give
``ratio_to_raw_float32``, the daemon against the plain float32 loop a user would otherwise write.

Also: ``keep_cost_ratio_16_children`` (:mod:`benchmarks.keep_cost`, the engine with 16 active children),
ingest MB/s by client on one topic (:mod:`benchmarks.ingest`: kafka-python, as the daemon configures
it, and confluent-kafka), and publish → follower latency for 1M and 10M parameters
(:mod:`benchmarks.throughput_follow`). Timings on a shared machine are noisy: compare runs of one
invocation. Progress on stderr; the last stdout line is one JSON object, also written to
``<out-dir>/throughput.json``. ``--quick``: a small profile for development (under 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks import ingest, keep_cost, progress
from benchmarks.throughput_follow import follower_latency
from benchmarks.throughput_path import fill_topic, run_path
from benchmarks.throughput_raw import replay
from daemon.learn.training import precision_name

_log = progress("throughput")
# profile defaults: (default, --quick)
PROFILES = {"batches": (150, 30), "keep_batches": (50, 15), "rows": (100, 100), "repeats": (3, 2),
            "publishes": (30, 10), "keep_cost_batches": (12, 4), "ingest_messages": (600, 200),
            "ingest_repeats": (2, 2)}
TARGETS = {"ratio_to_raw_no_merge": (">=", 0.95), "ratio_to_raw": (">=", 0.85),
           "keep_cost_ratio_16_children": ("<=", 1.2), "merge_cpu_share": ("<=", 0.10),
           "ingest_mb_per_s": (">=", 100.0), "follower_p99_ms.1M": ("<=", 50.0), "follower_p99_ms.10M": ("<=", 150.0)}
MERGES = ("never", "default")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small profile for development (< 3 min)")
    for name, (default, quick) in PROFILES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {default}, --quick {quick}")
    parser.add_argument("--streams", default="drift,keep", help="full-path streams (default: %(default)s)")
    parser.add_argument("--follower-params", default="1M,10M", help="model sizes for publish → follower "
                        "(default: %(default)s)")
    parser.add_argument("--out-dir", default="bench-results")


def _profile(args: argparse.Namespace) -> dict[str, int]:
    return {k: getattr(args, k) if getattr(args, k) is not None else v[1 if args.quick else 0]
            for k, v in PROFILES.items()}


def _params(label: str) -> int:
    label = label.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(label[-1:], 1)
    return int(float(label.rstrip("KM")) * scale)


def _phases(stream: str):
    from tools.scenarios import parse_phase

    if stream == "drift":
        return [parse_phase(p) for p in ("upright=identity", "rot90=rotate:90", "permuted=permute:1")]
    if stream == "keep":
        return [parse_phase("upright=identity")]
    raise ValueError(f"unknown stream {stream!r}: drift or keep")


def _sub_args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _met(result: dict, key: str) -> bool | None:
    value = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    op, bound = TARGETS[key]
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def _full_paths(args: argparse.Namespace, p: dict[str, int], dataset) -> tuple[dict, dict]:
    from daemon.learn.training import model_input
    from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis

    pool_x, pool_y = model_input(dataset.x, dataset.data_type), dataset.y
    runs, follow = {}, {}
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        _log(f"embedded broker {kafka.address}, redis {redis_server.address}")
        tag = f"tp{int(time.time())}"
        topics = {}
        for stream in streams:
            phases = _phases(stream)
            n = p["batches"] if stream == "drift" else p["keep_batches"]
            per_phase = n // len(phases) * p["rows"]
            topics[stream] = (f"{tag}.{stream}", fill_topic(kafka, f"{tag}.{stream}", dataset, phases, p["rows"],
                                                            per_phase))
            _log(f"topic {stream}: {topics[stream][1]['batches']} batches {topics[stream][1]['per_phase']}")
        for stream in streams:
            topic, filled = topics[stream]
            for merges in MERGES:
                name = f"{tag}-{stream}-{merges}"
                _log(f"{stream}, merges {merges}: full path")
                run, recorder = run_path(kafka, redis_server, topic, filled["batches"], name, merges)
                timed_calls = [c for c in recorder.calls if c.batch >= 1]   # batches 2..N, as the clock
                raw = replay(timed_calls, recorder.templates, pool_x, pool_y, p["repeats"])
                run["raw_samples_per_s"] = round(run["timed_rows"] / raw["seconds"], 1)
                run["ratio_to_raw"] = round(run["samples_per_s"] / run["raw_samples_per_s"], 4)
                run["optimizer_steps"] = {"daemon": recorder.steps_from(1), "raw": raw["optimizer_steps"],
                                          "daemon_all_batches": recorder.steps_from(0)}
                run["raw"] = raw
                if raw["precision"] != "float32":
                    plain = replay(timed_calls, recorder.templates, pool_x, pool_y, p["repeats"], precision="float32")
                    run["raw_float32_samples_per_s"] = round(run["timed_rows"] / plain["seconds"], 1)
                    run["ratio_to_raw_float32"] = round(run["samples_per_s"] / run["raw_float32_samples_per_s"], 4)
                    run["raw_float32"] = plain
                runs[f"{stream}/{merges}"] = run
                _log(f"{stream}, merges {merges}: {run['samples_per_s']} samples/s vs raw {run['raw_samples_per_s']}"
                     f" (ratio {run['ratio_to_raw']}); decisions {run['decisions']}; merge CPU share "
                     f"{run['merge_cpu_share']}; steps {run['optimizer_steps']}")
        for label in [s.strip() for s in args.follower_params.split(",") if s.strip()]:
            follow[label] = follower_latency(redis_server.address, _params(label), p["publishes"], f"{tag}-f{label}")
    return runs, follow


def main(args: argparse.Namespace) -> dict:
    import logging

    from tools.datasets import load_dataset

    for noisy in ("filial", "kafka"):   # a line per batch, per publish otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    p = _profile(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        _log(f"profile {p}")
        runs, follow = _full_paths(args, p, load_dataset("mnist5k"))
        _log("keep cost with 16 children (benchmarks.keep_cost)")
        children = keep_cost.main(_sub_args(keep_cost, ["--batches", str(p["keep_cost_batches"])]))
    finally:
        torch.set_num_threads(threads)
    _log("ingest by client (benchmarks.ingest)")
    consumed = ingest.main(_sub_args(ingest, ["--messages", str(p["ingest_messages"]),
                                              "--repeats", str(p["ingest_repeats"])]))
    head = "drift" if "drift/default" in runs else next(iter(runs), "").split("/")[0]
    default, never = runs.get(f"{head}/default", {}), runs.get(f"{head}/never", {})
    result = {
        "bench": "throughput",
        "ratio_to_raw_no_merge": never.get("ratio_to_raw"), "ratio_to_raw": default.get("ratio_to_raw"),
        "ratio_to_raw_float32_no_merge": never.get("ratio_to_raw_float32"),
        "ratio_to_raw_float32": default.get("ratio_to_raw_float32"),
        "samples_per_s_no_merge": never.get("samples_per_s"), "samples_per_s": default.get("samples_per_s"),
        "keep_cost_ratio_16_children": children["keep_cost_ratio_16_children"],
        "merge_cpu_share": default.get("merge_cpu_share"),
        "ingest_mb_per_s": consumed["ingest_mb_per_s"],
        "follower_p99_ms": {k: v["p99_ms"] for k, v in follow.items()},
        "follower_p50_ms": {k: v["p50_ms"] for k, v in follow.items()},
        "stages": default.get("stages"), "stages_no_merge": never.get("stages"),
        "headline_stream": head,
        "consume_mb_per_s": consumed["by_client"], "confluent_kafka": consumed["confluent_kafka"],
        "runs": runs, "children_16": children, "ingest": consumed, "follower": follow,
        "profile": {**p, "quick": args.quick, "streams": args.streams},
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": 1, "torch": torch.__version__,
                    "precision": precision_name(torch.device("cpu"))},
        "seconds": round(time.monotonic() - started, 1),
    }
    result["targets"] = {k: {"target": f"{op} {bound}", "met": _met(result, k)} for k, (op, bound) in TARGETS.items()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())), flush=True)
