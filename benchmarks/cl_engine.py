"""The engine alone on one ``filial bench cl`` stream: a fast look inside the learner (no broker, no
Redis, no follower), for developing it. Every merge is printed with its verdict, plan, per-slice
held-out figures and the candidate's test accuracy per slice; after each experience the served and
working models' test accuracy per slice; last line ``FINAL`` with the average, the per-slice accuracies,
*time to serve* as the bench counts it, the same count had every merge candidate been published
(``time_to_serve_candidates``: what the learner allows, whatever the gate says), and the working
model's average (the served model as it has learned, published or not).

    python -m benchmarks.cl_engine permuted --seed 1 --set merge_recency_half_life=0

Settings are filial's defaults with ``bench cl``'s merge trigger (count, every 4 updates, which
``--set merge_after_child_updates=N`` changes) and
``--set flat_name=value`` overrides. Not the benchmark: ``filial bench cl`` measures the real path.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from benchmarks import cl_metrics
from benchmarks.cl_streams import STREAMS, batches, build_stream
from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.records import MergeOutcome, Release
from daemon.learn.training import accuracy, model_input
from daemon.service.settings import load_settings


@dataclass(frozen=True)
class Step:
    """One thing that happened while :func:`drive` fed a stream: an experience started (``start``) or
    ended (``end``), a bootstrap version, a merge (accepted or not); ``release`` is set when a version
    was published (adopted as the daemon does), ``version`` is the served version after the step."""
    kind: str
    experience: int
    slice: str
    batches: int
    version: int
    tag: str = ""
    outcome: MergeOutcome | None = None
    release: Release | None = None


def drive(engine: Engine, stream, batch_size: int) -> Iterator[Step]:
    """The engine through ``stream`` as the daemon would take it with a count-triggered merge: each
    experience's training rows in batches, the bootstrap publish, a merge when one is due and at the end
    of each experience, every accepted version adopted (no servers)."""
    version, n = 0, 0
    for e, sl in enumerate(stream.experiences()):
        yield Step("start", e, sl.name, n, version)
        for x, y in batches(sl.x_train, sl.y_train, batch_size):
            result = engine.process(Batch(x, y, sl.name, stream.data_type, f"b{n}", BatchSource("bench", 0, n)))
            n += 1
            if result.publish_bootstrap:
                release = engine.release_bootstrap()
                version += 1
                engine.adopt_bootstrap(version)
                engine.record_served(release)
                yield Step("bootstrap", e, sl.name, n, version, release=release)
            if result.merge_due:
                yield from _merge(engine, e, sl.name, n, version, f"batch {n}")
                version = engine.served_version or version
        yield from _merge(engine, e, sl.name, n, version, "end of experience")
        version = engine.served_version or version
        yield Step("end", e, sl.name, n, version)


def _merge(engine: Engine, e: int, name: str, n: int, version: int, tag: str) -> Iterator[Step]:
    out = engine.merge()
    if out is None:
        return
    release = None
    if out.accepted:
        release = engine.release_merge(out)
        version += 1
        engine.adopt_merge(out, version)
        engine.record_served(release)
    yield Step("merge", e, name, n, version, tag, out, release)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cl_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", choices=STREAMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dataset", default="mnist5k",
                        help="the image streams' dataset (tools.datasets: mnist5k, digits, ...): a check that a "
                             "change is not tuned to the bench's data")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a flat setting, e.g. merge_recency_half_life=0 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
                 for k, v in (item.split("=", 1) for item in args.set)}
    from tools.datasets import load_dataset

    stream = build_stream(args.stream, None if args.stream == "tabular" else load_dataset(args.dataset), None, args.seed)
    overrides.setdefault("merge_after_child_updates", 4)   # the bench's trigger, unless --set says otherwise
    s = load_settings(num_classes=stream.num_classes, merge_trigger="count", seed=args.seed, **overrides)
    engine = Engine(s.model, s.learner, s.merge, torch.device("cpu"))
    served, candidates, first = [], [], {}

    def test_row(state) -> list[float]:
        model = engine.architecture.build()
        model.load_state_dict(state)
        return [round(accuracy(model, model_input(sl.x_test, stream.data_type), sl.y_test), 3) for sl in stream.slices]

    started = time.perf_counter()
    version = 0
    for step in drive(engine, stream, args.batch_size):
        version = step.version
        if step.kind == "start":
            first.setdefault(step.slice, step.batches)
        if step.release is not None:
            served.append((step.batches, test_row(engine.served_state())))
        if step.kind == "bootstrap":
            print(f"  bootstrap v{version} at batch {step.batches}")
        elif step.kind == "merge":
            out = step.outcome
            cons = out.plan.get("consolidate", {})
            print(f"  merge at {step.tag}: {'v%d' % version if out.accepted else 'rejected'}; "
                  f"{out.plan.get('chosen', '-')}; consolidation {cons.get('epochs')} epochs (best "
                  f"{cons.get('best_epoch')}); {out.reason}{'; held for confirmation' if out.held else ''}")
            print(f"    held-out served {out.served_metrics}\n    candidate      {out.candidate_metrics}")
            if out.state is not None:  # the same candidate on the test rows: a good one the gate could not confirm
                candidates.append((step.batches, test_row(out.state)))
                print(f"    test rows: candidate {candidates[-1][1]}")
        elif step.kind == "end":
            print(f"experience {step.experience} ({step.slice}): served {test_row(engine.served_state())}, working "
                  f"{test_row(engine.working_state())}, {time.perf_counter() - started:.0f} s", flush=True)
    final = test_row(engine.served_state())
    working = test_row(engine.working_state())

    def time_to_serve(versions) -> dict:  # as the bench counts it: 1 when the slice was served before it began
        return cl_metrics.time_to_serve({s.name: first[s.name] + 1 for s in stream.slices},
                                        [(b, {s.name: row[j] for j, s in enumerate(stream.slices)}) for b, row in versions],
                                        {s.name: final[j] for j, s in enumerate(stream.slices)})

    tts = time_to_serve(served)
    # the same count had every merge candidate been published: what the learner allows, whatever the gate says
    tts_candidates = time_to_serve(sorted(served + candidates, key=lambda v: v[0]))
    # what the learner holds at the end beside what it serves: the difference is what the gate has not yet
    # found significant on the held-out rows (short streams end with a few such merges pending)
    summary = {"avg_acc": round(sum(final) / len(final), 4), "final": final, "time_to_serve": tts,
               "time_to_serve_candidates": tts_candidates, "versions": version,
               "working_avg_acc": round(sum(working) / len(working), 4),
               "children_spawned": engine.counters.children_spawned}
    print("FINAL", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
