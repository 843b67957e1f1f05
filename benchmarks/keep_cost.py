"""Keep cost: what a batch the served model keeps costs with 16 active children against none (the
children are not run for a kept batch, so the ratio should stay near 1; issue 14 asks <= 1.2).

The engine alone (no servers), default settings, one torch thread: the first two experiences of the
rotated MNIST-5k stream of ``filial bench cl`` build a served model and a child; the child is copied
until 16 are active; then ``--batches`` in-distribution batches are timed, once with the 16 children
active and once with them retired. Last line: one JSON object with ``keep_cost_ratio_16_children``
(median keep time with 16 children / with none) and both medians in ms.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks import progress
from benchmarks.cl_streams import batches, build_stream
from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine

_log = progress("keep_cost")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=12, help="timed batches per case (default: %(default)s)")
    parser.add_argument("--children", type=int, default=16, help="active children (default: %(default)s)")


def main(args: argparse.Namespace) -> dict:
    from daemon.service.settings import load_settings
    from tools.datasets import load_dataset

    torch.set_num_threads(1)
    stream = build_stream("rotated", load_dataset("mnist5k"), None, 0)
    s = load_settings(num_classes=10, merge_after_child_updates=10**6, merge_trigger="count", seed=0,
                      max_children=max(64, args.children))
    engine = Engine(s.model, s.learner, s.merge, torch.device("cpu"))
    experiences, n = list(stream.experiences()), 0
    for sl in experiences[:2]:
        for x, y in batches(sl.x_train, sl.y_train, 50):
            result = engine.process(Batch(x, y, sl.name, stream.data_type, f"b{n}", BatchSource("bench", 0, n)))
            n += 1
            if result.publish_bootstrap:
                engine.release_bootstrap()
                engine.adopt_bootstrap(1)
    tree = engine._state.tree   # a benchmark's view inside the engine: children are copied, not learned
    active = tree.active_children()
    if not active:
        raise RuntimeError("no child was spawned on the rotated stream's first two experiences")
    for i in range(args.children - len(active)):
        clone = copy.deepcopy(active[0])
        clone.node_id = f"copy{i}"
        tree.add(clone)
    rows = list(batches(experiences[0].x_train, experiences[0].y_train, 50))[:args.batches]

    def keep_ms(tag: str) -> list[float]:
        times = []
        for i, (x, y) in enumerate(rows):
            started = time.perf_counter()
            result = engine.process(Batch(x, y, experiences[0].name, stream.data_type, f"{tag}{i}",
                                          BatchSource("bench", 1, n + i)))
            if result.action == "keep":
                times.append(1000 * (time.perf_counter() - started))
        return times

    with_children = keep_ms("with")
    _log(f"{len(tree.active_children())} children: median keep {statistics.median(with_children):.1f} ms")
    for child in tree.active_children():
        child.status = "retired"
    without = keep_ms("without")
    _log(f"no children: median keep {statistics.median(without):.1f} ms")
    return {"bench": "keep_cost", "children": args.children,
            "keep_ms_with_children": round(statistics.median(with_children), 1),
            "keep_ms_without": round(statistics.median(without), 1),
            "keep_cost_ratio_16_children": round(statistics.median(with_children) / statistics.median(without), 3),
            "kept_batches": [len(with_children), len(without)]}
