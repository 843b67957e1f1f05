"""The engine alone on one ``filial bench cl`` stream: a fast look inside the learner (no broker, no
Redis, no follower), for developing it. Every merge is printed with its verdict, plan and per-slice
held-out figures; after each experience the served and working models' test accuracy per slice; last
line ``FINAL`` with the average, the per-slice accuracies and *time to serve* as the bench counts it.

    python -m benchmarks.cl_engine permuted --seed 1 --set merge_recency_half_life=0

Settings are filial's defaults with ``bench cl``'s merge trigger (count, every 4 updates) and
``--set flat_name=value`` overrides. Not the benchmark: ``filial bench cl`` measures the real path.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.cl_streams import STREAMS, batches, build_stream
from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.learn.training import accuracy, model_input
from daemon.service.settings import load_settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cl_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", choices=STREAMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a flat setting, e.g. merge_recency_half_life=0 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
                 for k, v in (item.split("=", 1) for item in args.set)}
    from tools.datasets import load_dataset

    stream = build_stream(args.stream, None if args.stream == "tabular" else load_dataset("mnist5k"), None, args.seed)
    s = load_settings(num_classes=stream.num_classes, merge_after_child_updates=4, merge_trigger="count",
                      seed=args.seed, **overrides)
    engine = Engine(s.model, s.learner, s.merge, torch.device("cpu"))
    version, n, served, first = 0, 0, [], {}

    def test_row(state) -> list[float]:
        model = engine.architecture.build()
        model.load_state_dict(state)
        return [round(accuracy(model, model_input(sl.x_test, stream.data_type), sl.y_test), 3) for sl in stream.slices]

    def merge(tag: str) -> None:
        nonlocal version
        out = engine.merge()
        if out is None:
            return
        if out.accepted:
            release = engine.release_merge(out)
            version += 1
            engine.adopt_merge(out, version)
            engine.record_served(release)
            served.append((n, test_row(engine.served_state())))
        cons = out.plan.get("consolidate", {})
        print(f"  merge at {tag}: {'v%d' % version if out.accepted else 'rejected'}; {out.plan.get('chosen', '-')}; "
              f"consolidation {cons.get('epochs')} epochs (best {cons.get('best_epoch')}); {out.reason}")
        print(f"    held-out served {out.served_metrics}\n    candidate      {out.candidate_metrics}")

    started = time.perf_counter()
    for e, sl in enumerate(stream.experiences()):
        first.setdefault(sl.name, n)
        for x, y in batches(sl.x_train, sl.y_train, args.batch_size):
            result = engine.process(Batch(x, y, sl.name, stream.data_type, f"b{n}", BatchSource("bench", 0, n)))
            n += 1
            if result.publish_bootstrap:
                release = engine.release_bootstrap()
                version += 1
                engine.adopt_bootstrap(version)
                engine.record_served(release)
                served.append((n, test_row(engine.served_state())))
                print(f"  bootstrap v{version} at batch {n}")
            if result.merge_due:
                merge(f"batch {n}")
        merge("end of experience")
        print(f"experience {e} ({sl.name}): served {test_row(engine.served_state())}, working "
              f"{test_row(engine.working_state())}, {time.perf_counter() - started:.0f} s", flush=True)
    final = test_row(engine.served_state())
    tts = {s.name: next((b - first[s.name] for b, row in served if b > first[s.name] and row[j] >= 0.9 * final[j]), None)
           for j, s in enumerate(stream.slices)}
    summary = {"avg_acc": round(sum(final) / len(final), 4), "final": final, "time_to_serve": tts, "versions": version}
    print("FINAL", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
