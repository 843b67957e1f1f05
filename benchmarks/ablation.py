"""``filial bench ablation``: which of the learner's tools pay off on which stream.

filial runs through its real path (as in ``filial bench cl``: embedded broker and Redis, the
``Service``, merges due by count, a follower evaluated after each experience) on the cl streams,
once with the default settings and once per *variant*, a setting change that takes one tool away
or puts one in:

- ``default``: the served model learns every batch, children by copy, the granularity controller,
  consolidation on slice-balanced replay;
- ``no_consolidation``: ``merge_consolidate_epochs=0``;
- ``consolidate_3_epochs``: always 3 epochs, no early stopping on the selection rows;
- ``children_only``: ``train_served=false`` (the seed's behaviour: only children learn);
- ``average_merge``: ``merge_method=average``, ``merge_level=model`` (no MagMax/TIES, no controller);
- ``child_tuning``: ``child_tuning=fisher`` (Child-Tuning-D masks on same-size children);
- ``compact_hkt``: ``child_size_ratio=0.5`` (compact children trained with HKT, merged into the
  served model by bidirectional distillation).

Reported per variant and stream: final average accuracy (the mean of the last row of the accuracy
matrix) and forgetting, versions published and wall seconds; and the variant's mean over streams
minus the default's. One seed and 300-row slices by default (``--rows-per-slice``, ``--seeds``).
The last stdout line is one JSON object ``{"variants": {variant: {stream: {...}}}, "delta": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from typing import Any

from benchmarks import progress
from benchmarks.cl_metrics import mean_sd, summarize

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_consolidation": {"merge_consolidate_epochs": 0},
    "consolidate_3_epochs": {"merge_consolidate_epochs": 3, "merge_consolidate_patience": 0},
    "children_only": {"train_served": False},
    "average_merge": {"merge_method": "average", "merge_level": "model"},
    "child_tuning": {"child_tuning": "fisher"},
    "compact_hkt": {"child_size_ratio": 0.5},
    "plain_cross_entropy": {"label_smoothing": 0.0},
}
STREAMS = ("split", "permuted", "rotated", "tabular")

log = progress("ablation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: %(default)s)")
    parser.add_argument("--streams", default=",".join(STREAMS), help="comma list (default: %(default)s)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default %(default)s)")
    parser.add_argument("--rows-per-slice", type=int, default=300, help="rows of each slice, train+test "
                        "(default %(default)s; 0: all)")
    parser.add_argument("--batch-size", type=int, default=50, help="rows per produced batch (default %(default)s)")
    parser.add_argument("--merge-every", type=int, default=4, help="a merge is due every N updates "
                        "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")


def _names(text: str, known, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"filial bench ablation: unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return names


def main(args: argparse.Namespace) -> dict:
    import torch

    from benchmarks.cl_filial import FilialRunner, filial_settings
    from benchmarks.cl_streams import build_stream
    from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
    from tools.datasets import load_dataset

    variants = _names(args.variants, VARIANTS, "variant")
    streams = _names(args.streams, STREAMS, "stream")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("filial").setLevel(logging.WARNING)
    ds = load_dataset("mnist5k") if set(streams) - {"tabular"} else None
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    runs = 0
    with contextlib.ExitStack() as stack:
        kafka, redis_server = stack.enter_context(EmbeddedKafka()), stack.enter_context(EmbeddedRedis())
        for name in streams:
            stream = build_stream(name, ds, args.rows_per_slice or None)
            for variant in variants:
                figures = []
                for seed in seeds:
                    runs += 1
                    tag = f"abl-{name}-{variant}-{seed}-{runs}-{int(time.time()) % 100_000}"
                    settings = filial_settings(kafka.address, redis_server.address, tag, stream, seed=seed,
                                               merge_every=args.merge_every, device="cpu",
                                               overrides=VARIANTS[variant])
                    run = FilialRunner(stream, settings, batch_size=args.batch_size).run(kafka, seed)
                    figures.append((summarize(run.matrix, run.order), run))
                avg = mean_sd([f["avg_acc"] for f, _ in figures])[0]
                results.setdefault(variant, {})[name] = {
                    "avg_acc": round(avg, 4),
                    "forgetting": _round(mean_sd([f["forgetting"] for f, _ in figures])[0]),
                    "versions": mean_sd([r.versions for _, r in figures])[0],
                    "seconds": round(mean_sd([r.seconds for _, r in figures])[0], 1)}
                log(f"{name}: {variant}: avg {avg:.4f} ({results[variant][name]['versions']} versions, "
                    f"{results[variant][name]['seconds']}s)")

    def mean_over_streams(variant: str) -> float:
        return sum(results[variant][s]["avg_acc"] for s in streams) / len(streams)

    delta = ({v: {**{s: round(results[v][s]["avg_acc"] - results["default"][s]["avg_acc"], 4) for s in streams},
                  "mean": round(mean_over_streams(v) - mean_over_streams("default"), 4)}
              for v in variants if v != "default"} if "default" in variants else {})
    return {"bench": "ablation", "variants": results, "delta": delta,
            "config": {"streams": streams, "seeds": seeds, "rows_per_slice": args.rows_per_slice,
                       "batch_size": args.batch_size, "merge_every": args.merge_every},
            "wall_s": round(time.perf_counter() - started, 1)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
