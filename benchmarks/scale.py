"""How far one merge leader carries several learners (issue 13): learner throughput, merge cost, a model of N.

1. **Learner throughput.** For 1, 2 and 3 learners at once, each a process with one torch thread
   (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) running the engine (filial's default settings,
   default CNN) on its own MNIST-5k slices (a pixel permutation per learner and phase, so it spawns,
   trains children and merges on the count trigger as in ``bench cl``): after ``--warmup`` batches,
   samples/s (wall) and CPU-seconds per sample (``time.process_time``) over ``--window`` seconds.
   The engine alone: no broker, no Redis (decode and checkpoint costs are small beside training on the
   CPU). On a machine with fewer cores than learners (this one has 2), the extra learners measure
   contention, not scaling: the output says how many cores there were.
2. **Merge cost.** One engine (default CNN, default controller budget) learns two slices until it has
   children, then ``Engine.merge`` is timed with k = 0..``--max-contributions`` contributions: each
   another learner's served model (the engine's, perturbed: a distinct weight vector) with the
   held-out and replay rows of a slice of its own (another permutation), so the gate, the selection
   and the consolidation grow as they do with real learners. Seconds per member: the least-squares
   slope of merge seconds over members (the engine's active children plus k).
3. **A model of N machines.** The leader merges its own children plus one contribution per other
   learner (their children go to the zoo, not into its merge) every ``merge_interval`` (default 60 s):
   merge(N) = merge(k=0) + s_per_member x (N - 1). One leader saturates where that reaches the
   interval: beyond it merges run back to back (the merge job
   coalesces missed runs, ``max_instances=1``), so the served model gets fresher work at most once per
   merge duration while learners keep learning and contributing; the design's answer then is the zoo
   (serve members directly: ``filial serve``, mode ``route``) or a leader per line (shard slices by line).

Last stdout line: one JSON object with ``learners`` ({"1": samples/s per learner, ...}),
``cpu_s_per_sample``, ``leader_merge_s_per_member`` and ``model``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from benchmarks import progress

_log = progress("scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-learners", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=12, help="batches before measuring (bootstrap, a child)")
    parser.add_argument("--window", type=float, default=25.0, help="seconds measured per learner count")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-contributions", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="merges timed per k (the best counts)")
    parser.add_argument("--merge-interval", type=float, default=None,
                        help="merge interval of the model (default: the daemon's merge_interval_seconds)")
    parser.add_argument("--seed", type=int, default=0)


def _engine(seed: int):
    from daemon.engine.engine import Engine
    from daemon.service.settings import load_settings

    s = load_settings(seed=seed, merge_trigger="count")
    return Engine(s.model, s.learner, s.merge, torch.device("cpu")), s


def _slices(seed: int, n: int):
    """``n`` permuted MNIST-5k slices: (name, x uint8, y)."""
    from tools.datasets import load_dataset

    ds = load_dataset("mnist5k")
    gen = torch.Generator().manual_seed(seed)
    flat = ds.x.reshape(len(ds.x), -1)
    out = []
    for i in range(n):
        perm = torch.randperm(flat.shape[1], generator=gen)
        out.append((f"p{seed}-{i}", flat[:, perm].reshape(ds.x.shape), ds.y))
    return out


def _batches(seed: int, batch_size: int):
    """Endless: each slice for 25 batches, then the next (drift)."""
    from consumers.wire import Batch, BatchSource

    n = 0
    while True:
        for name, x, y in _slices(seed + 1000 * n, 4):
            for b in range(25):
                lo = (b * batch_size) % (len(y) - batch_size)
                yield Batch(x[lo:lo + batch_size], y[lo:lo + batch_size], name, "image", f"{name}-{n}-{b}",
                            BatchSource("bench", 0, n))
                n += 1


def _learner(seed: int, warmup: int, window: float, batch_size: int, start, queue) -> None:
    torch.set_num_threads(1)
    engine, _ = _engine(seed)
    version, stream, rows = 0, _batches(seed, batch_size), 0

    def step() -> int:
        nonlocal version
        batch = next(stream)
        result = engine.process(batch)
        if result.publish_bootstrap:
            version += 1
            engine.adopt_bootstrap(version)
        if result.merge_due:
            out = engine.merge()
            if out is not None and out.accepted:
                version += 1
                engine.adopt_merge(out, version)
        return len(batch.y)

    for _ in range(warmup):
        step()
    start.wait()   # every learner measures the same window
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < window:
        rows += step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    queue.put({"samples_per_s": rows / wall, "cpu_s_per_sample": cpu / rows, "samples": rows})


def throughput(args) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    out = {}
    for n in range(1, args.max_learners + 1):
        os.environ["OMP_NUM_THREADS"] = "1"
        start, queue = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_learner, args=(args.seed + i, args.warmup, args.window, args.batch_size,
                                                     start, queue)) for i in range(n)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=args.window + 600) for _ in procs]
        for p in procs:
            p.join()
        out[str(n)] = {"samples_per_s": round(statistics.mean(r["samples_per_s"] for r in results), 1),
                       "cpu_s_per_sample": round(statistics.mean(r["cpu_s_per_sample"] for r in results), 6),
                       "total_samples_per_s": round(sum(r["samples_per_s"] for r in results), 1)}
        _log(f"{n} learner(s): {out[str(n)]}")
    return out


def merge_cost(args) -> dict:
    from daemon.engine.records import Contribution

    torch.set_num_threads(1)
    engine, s = _engine(args.seed)
    stream, version = _batches(args.seed, args.batch_size), 0
    for _ in range(40):   # bootstrap on one slice, then a second: children to merge
        result = engine.process(next(stream))
        if result.publish_bootstrap:
            version += 1
            engine.adopt_bootstrap(version)
    children = len(engine.active_children())
    base = engine.contribution("leader")
    gen = torch.Generator().manual_seed(args.seed)
    others = []
    for j, (name, x, y) in enumerate(_slices(args.seed + 77, args.max_contributions)):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in base.state.items()}
        xs, ys = x[:200], y[:200]   # wire rows, as the buffers keep them
        others.append(Contribution(f"l{j + 1}", base.version, 1000, base.architecture, state,
                                   {name: (xs[:100], ys[:100])}, {name: (xs[100:], ys[100:])}))
    rows = []
    for k in range(args.max_contributions + 1):
        times = []
        for _ in range(args.repeats):
            engine._state.last_merge_signature = None   # the same snapshot again (it skips repeats otherwise)
            t0 = time.perf_counter()
            out = engine.merge(others[:k])   # not adopted: every repeat merges the same children
            assert out is not None, "nothing to merge"
            times.append(time.perf_counter() - t0)
        rows.append({"contributions": k, "members": children + k, "merge_s": round(min(times), 3)})
        _log(f"merge with {k} contribution(s), {children + k} members: {rows[-1]['merge_s']} s")
    xs, ys = [r["members"] for r in rows], [r["merge_s"] for r in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    interval = args.merge_interval or s.merge.interval_seconds
    return {"rows": rows, "children": children, "s_per_member": round(slope, 4),
            "fixed_s": round(my - slope * mx, 3), "interval_s": interval}


def main(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    cores = os.cpu_count() or 1
    _log(f"{cores} cores: learner counts above {cores} measure contention for the CPU, not scaling")
    learners = throughput(args)
    merge = merge_cost(args)
    per_member = max(merge["s_per_member"], 1e-6)
    own = merge["rows"][0]["merge_s"]   # the leader's own children; each other learner adds one contribution
    model = {"merge_interval_s": merge["interval_s"], "leader_own_merge_s": own,
             "merge_s_at_n": {str(n): round(own + per_member * (n - 1), 1) for n in (1, 4, 16, 64)},
             "leader_saturates_at_learners": 1 + int(max(merge["interval_s"] - own, 0) / per_member),
             "then": "merges run back to back (the job coalesces missed runs): the served model absorbs the "
                     "learners' work at most once per merge while they keep learning; past that, shard slices "
                     "over lines (a leader each) or serve zoo members directly (`filial serve`, mode 'route')"}
    return {"cores": cores, "note": f"{cores} cores: more learners than cores measure contention",
            "learners": {n: r["samples_per_s"] for n, r in learners.items()},
            "cpu_s_per_sample": {n: r["cpu_s_per_sample"] for n, r in learners.items()},
            "total_samples_per_s": {n: r["total_samples_per_s"] for n, r in learners.items()},
            "leader_merge_s_per_member": merge["s_per_member"], "merge": merge, "model": model,
            "seconds": round(time.monotonic() - started, 1)}


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
