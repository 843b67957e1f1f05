"""``filial bench cl``: learning quality of the served model, end to end, against Avalanche 0.6 on the
same streams, tensors and architecture; plus a stationary control.

Streams (:mod:`benchmarks.cl_streams`, no download): MNIST-5k **split** (class-incremental, 5 x 2
classes), **permuted** (5 pixel permutations), **rotated** (0-120 degrees, 5 angles) and a synthetic
**tabular** stream (Gaussian blobs that move twice, covariate shift, then two labels swapped, concept
shift). Each slice has a fixed train/test split; only train rows are streamed or trained on. An
*experience* is one slice's train rows, streamed as ``--batch-size`` batches.

**filial** runs through its real path (:mod:`benchmarks.cl_filial`): embedded broker and Redis, the
``Service`` with default settings except merges due by count (every ``--merge-every`` updates, never
by the clock), the stream's classes and the seed; batches produced with the wire codec in lock-step;
``merge_now()`` at the end of each experience; a follower receives the versions, and the version it
holds after each experience is evaluated on every slice's test rows.

**Baselines** (:mod:`benchmarks.cl_baselines`): Avalanche's Naive, EWC, LwF, Replay (200, 500 and
filial's stored rows), GDumb (500 and filial's stored rows) and JointTraining (the ceiling), same
architecture (``infer_architecture``), Adam at the learner's learning rate and mini-batch size; each
at its best of ``--epochs`` epochs per experience (the best average accuracy on the first seed; the
other seeds run at that setting). They run in ``--jobs`` worker processes (default: one per CPU core,
one torch thread each) while filial runs here; each run seeds itself and builds its own model, so
its matrix is the one a serial run (``--jobs 1``, all in this process) gives.

Measured, per stream and contender, mean over ``--seeds`` (sd of the average accuracy): the
**accuracy matrix** as Avalanche builds it (a row after each experience, a recurring slice being a
new experience; a column per distinct slice; a follower that has received nothing scores 0);
**avg_acc** = mean of the last row; **forgetting** = Avalanche's StreamForgetting (accuracy on a slice
right after the last experience that trained on it minus at the end, averaged over the slices trained
before the last experience); **bwt** = its negative (Lopez-Paz & Ranzato 2017); wall **seconds**
(training and the per-experience evaluations; filial: the whole path; with ``--jobs`` above 1, on
cores shared with the other runs); **optimizer_steps** (every optimiser step in the process, via a
global post-step hook); **stored_rows** (rows kept: replay memory; filial: its replay plus held-out
buffers, from its settings; joint: every row).

filial only: **time_to_serve** per slice = batches from the slice's first batch until the version the
follower holds reaches 90 % of the slice's final accuracy (1 = at its first batch; the worst seed);
**drift_delay** per slice (all but the first) = index of the first batch of the slice the daemon
flags as drift (1 = its first batch; ``null`` = never; the worst seed).

**Stationary control** (first seed): one MNIST-5k slice streamed for ``--stationary-batches`` batches
(rows repeat, reshuffled); ``acc`` = the served version's test accuracy at the end, ``plain_acc`` = the
same architecture trained with ``fit`` on the same rows (best of ``--epochs``), and the daemon's drift
events and spawns (both should be 0).

Output: progress on stderr; ``<out-dir>/cl.png`` (accuracy matrices) and ``<out-dir>/cl.json`` (this
summary plus every matrix); the last stdout line is one JSON object: ``{"streams": {stream: {contender:
{avg_acc, avg_acc_sd, forgetting, bwt, seconds, optimizer_steps, stored_rows, ...}}}, "time_to_serve":
{stream: {slice: batches}}, "drift_delay": {...}, "stationary": {acc, plain_acc, spawns, drift_events}}``.
``--quick``: one seed, 5 epochs, 300-row slices, a 40-batch stationary stream (minutes). Where filial
fails (its daemon stops), the bench says so in ``errors`` and goes on with the baselines.
Needs the ``bench`` extra (avalanche-lib 0.6.0) for the baselines.

Over 300 lines: the orchestration of streams x contenders x seeds and the summary it prints; the
streams, metrics, filial's path, the baselines (and their worker pool) and the plot are their own
modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import progress
from benchmarks.cl_metrics import aggregate, mean_matrix, mean_sd, rounded as _r, summarize, worst

STREAM_NAMES = ("split", "permuted", "rotated", "tabular", "stationary")
QUICK = {"seeds": "0", "epochs": "5", "rows_per_slice": 300, "stationary_batches": 40}
FULL = {"seeds": "0,1,2", "epochs": "2,5,20", "rows_per_slice": None, "stationary_batches": 320}

_progress, _log_lock = progress("cl"), threading.Lock()


def log(msg: str) -> None:
    with _log_lock:  # whole lines: the pool's threads log finished runs too
        _progress(msg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.cl_baselines import BASELINES

    parser.add_argument("--quick", action="store_true",
                        help="one seed, 5 epochs, 300-row slices, 40 stationary batches (development)")
    parser.add_argument("--streams", default=",".join(STREAM_NAMES), help="comma list (default: %(default)s)")
    parser.add_argument("--contenders", default=",".join(("filial", *BASELINES)),
                        help="comma list (default: %(default)s)")
    parser.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; --quick 0)")
    parser.add_argument("--epochs", default=None, help="epochs per experience the baselines try, each at its "
                        "best (default 2,5,20; --quick 5)")
    parser.add_argument("--rows-per-slice", type=int, default=None,
                        help="keep this many rows of each slice, train+test (default: all, ~1000; --quick 300)")
    parser.add_argument("--batch-size", type=int, default=50, help="rows per produced batch (default %(default)s)")
    parser.add_argument("--merge-every", type=int, default=4,
                        help="filial's merge_after_child_updates: a merge is due every N updates (default %(default)s)")
    parser.add_argument("--stationary-batches", type=int, default=None,
                        help="batches of the stationary control (default 320; --quick 40)")
    parser.add_argument("--ewc-lambda", type=float, default=100.0, help="EWC penalty, separate mode (default "
                        "%(default)s: the best of 1e2, 1e3, 1e4, 1e5 on permuted, 600-row slices, 5 epochs)")
    parser.add_argument("--lwf-alpha", type=float, default=1.0, help="LwF distillation weight (default %(default)s)")
    parser.add_argument("--lwf-temperature", type=float, default=2.0, help="LwF temperature (default %(default)s)")
    parser.add_argument("--baseline-label-smoothing", type=float, default=0.0,
                        help="the baselines' cross-entropy label smoothing (default %(default)s: Avalanche's "
                        "strategies as users train them; 0.1: the loss filial trains with by default, to see how "
                        "much of a gap is the loss)")
    parser.add_argument("--device", default="cpu", help="device of filial and the baselines (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: frugal on a shared machine; 0 leaves torch's)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes for the baselines, one torch thread each (default: the CPU "
                        "cores, %(default)s); 1 runs them in this process, one after another")
    parser.add_argument("--verbose", action="store_true", help="the daemon's INFO log (one line per batch)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out-dir", default="bench-results")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"filial bench cl: unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return names


def _log_run(task, future) -> None:
    """Progress: one line per finished baseline run (from the thread that got its result)."""
    where = f"{task.spec.stream}: {task.name} at {task.epochs} epochs, seed {task.seed}"
    if future.exception() is not None:
        log(f"{where} FAILED: {future.exception()}")
        return
    run = future.result()
    f = summarize(run.matrix, run.order)
    log(f"{where}: avg {f['avg_acc']:.4f}, forgetting {_r(f['forgetting'])}, {run.seconds:.1f}s, "
        f"{run.optimizer_steps} steps")


class _Bench:
    def __init__(self, args: argparse.Namespace, rows_per_slice: int | None = None) -> None:
        self.args, self.rows_per_slice = args, rows_per_slice
        self.device = torch.device(args.device)
        self.matrices: dict[str, dict[str, Any]] = {}
        self.servers: tuple[Any, Any] | None = None
        self.runs = 0
        self.errors: list[str] = []

    # --- filial -----------------------------------------------------------------------------------
    def settings(self, stream, seed: int, kafka: str = "127.0.0.1:1", redis_url: str = "redis://127.0.0.1:1"):
        from benchmarks.cl_filial import filial_settings

        self.runs += 1
        tag = f"cl-{stream.name}-{seed}-{self.runs}-{int(time.time()) % 100_000}"
        return filial_settings(kafka, redis_url, tag, stream, seed=seed, merge_every=self.args.merge_every,
                               device=self.args.device)

    def filial_rows(self, stream, total_batches: int | None = None) -> int:
        from benchmarks.cl_filial import stored_rows

        return stored_rows(self.settings(stream, 0), stream, self.args.batch_size, total_batches)

    def run_filial(self, stream, seed: int, total_batches: int | None = None):
        from benchmarks.cl_filial import FilialRunner

        kafka, redis_server = self.servers
        settings = self.settings(stream, seed, kafka.address, redis_server.address)
        runner = FilialRunner(stream, settings, batch_size=self.args.batch_size, total_batches=total_batches,
                              progress=log)
        return runner.run(kafka, seed)

    # --- one stream ----------------------------------------------------------------------------------
    def stream(self, stream, contenders: list[str], seeds: list[int]) -> dict[str, Any]:
        """filial's runs on ``stream``, here (the baselines' are queued on the pool: :meth:`baselines`)."""
        out: dict[str, Any] = {"contenders": {}, "time_to_serve": None, "drift_delay": None}
        mats = self.matrices.setdefault(stream.name, {"columns": stream.columns, "order": stream.order})
        runs = []
        for seed in seeds if "filial" in contenders else []:
            log(f"{stream.name}: filial, seed {seed} ({len(stream.order)} experiences, "
                f"{sum(len(stream.slices[j].y_train) for j in stream.order)} train rows)")
            try:
                r = self.run_filial(stream, seed)
            except Exception as exc:  # the learner failed: say so in the summary, go on with the baselines
                self.errors.append(f"{stream.name} filial seed {seed}: {type(exc).__name__}: {exc}")
                log(f"{stream.name}: filial seed {seed} FAILED: {self.errors[-1]}")
                continue
            runs.append(r)
            log(f"{stream.name}: filial seed {seed}: avg {summarize(r.matrix, r.order)['avg_acc']:.4f}, "
                f"{r.versions} versions, {r.counters.get('drift_events')} drift events, "
                f"{r.counters.get('children_spawned')} spawns, {r.seconds:.0f}s; time to serve "
                f"{r.time_to_serve}; drift delay {r.drift_delay}")
        if not runs:
            if "filial" in contenders:
                out["contenders"]["filial"] = {"avg_acc": None, "error": self.errors[-1]}
            return out
        c = lambda key: _r(mean_sd([r.counters.get(key, 0) for r in runs])[0], 2)  # noqa: E731
        out["contenders"]["filial"] = aggregate(runs, {
            "versions": _r(mean_sd([r.versions for r in runs])[0], 2), "batches": runs[0].batches,
            "drift_events": c("drift_events"), "spawns": c("children_spawned"),
            "merges_accepted": c("merges_accepted"), "merges_rejected": c("merges_rejected")})
        out["time_to_serve"] = {s: worst([r.time_to_serve[s] for r in runs]) for s in runs[0].time_to_serve}
        out["drift_delay"] = {s: worst([r.drift_delay[s] for r in runs]) for s in runs[0].drift_delay}
        mats["filial"] = {"mean": mean_matrix([r.matrix for r in runs]), "per_seed": [r.matrix for r in runs],
                          "served": [r.served for r in runs]}
        return out

    # --- the baselines, on the pool --------------------------------------------------------------------
    def plan(self, stack: contextlib.ExitStack, built: dict[str, Any], contenders: list[str], seeds: list[int],
             epochs: list[int], ds) -> dict[str, dict[str, Any]]:
        """Start the pool (``--jobs``) and queue every baseline run of every stream on it now, so that the
        workers are busy while filial runs here."""
        from benchmarks.cl_baselines import Plan, Spec, Task, pool
        from benchmarks.cl_streams import IMAGE_STREAMS

        baselines = [c for c in contenders if c != "filial"]
        if not baselines or not built:
            return {}
        runner = stack.enter_context(pool(self.args.jobs, {"mnist5k": ds} if ds is not None else None))
        plans: dict[str, dict[str, Any]] = {}
        for name, stream in built.items():
            learner = self.settings(stream, 0).learner
            spec = Spec(name, "mnist5k" if name in IMAGE_STREAMS else None, self.rows_per_slice, stream.data_type,
                        learner.learning_rate, learner.train_batch_size, self.args.device, self.args.ewc_lambda,
                        self.args.lwf_alpha, self.args.lwf_temperature, self.args.baseline_label_smoothing)
            task = Task(spec, "", 0, seeds[0], self.filial_rows(stream))
            plans[name] = {c: Plan(runner, replace(task, name=c), seeds, epochs, log=_log_run) for c in baselines}
        return plans

    def baselines(self, stream, plans: dict[str, Any], seeds: list[int], epochs: list[int],
                  out: dict[str, Any]) -> None:
        """Each baseline at its best epochs (chosen on the first seed), over the seeds (waits for the runs)."""
        mats = self.matrices.setdefault(stream.name, {"columns": stream.columns, "order": stream.order})
        for name, plan in plans.items():
            runs, best, first = plan.runs(), plan.best(), {e: plan.first[e].result() for e in epochs}
            agg = out["contenders"][name] = aggregate(runs, {
                "epochs": best,
                "by_epochs": {str(e): _r(summarize(r.matrix, r.order)["avg_acc"]) for e, r in first.items()}})
            if len(seeds) > 1:
                log(f"{stream.name}: {name} at {best} epochs over seeds {seeds}: avg {agg['avg_acc']:.4f} +- "
                    f"{agg['avg_acc_sd']:.4f}")
            mats[name] = {"mean": mean_matrix([r.matrix for r in runs]), "per_seed": [r.matrix for r in runs],
                          "epochs": best}

    # --- stationary control --------------------------------------------------------------------------
    def stationary(self, ds, seed: int, epochs: list[int]) -> dict[str, Any]:
        from benchmarks.cl_streams import batches, stationary_stream
        from daemon.learn.models import infer_architecture
        from daemon.learn.training import accuracy, fit, model_input

        total = self.args.stationary_batches
        rows = total * self.args.batch_size
        stream = stationary_stream(ds, rows=min(len(ds.y), math.ceil(rows / 0.8)), seed=0)
        sl = stream.slices[0]
        log(f"stationary: filial on {total} batches of {self.args.batch_size} ({len(sl.y_train)} distinct rows, "
            f"repeated as needed), seed {seed}")
        run = self.run_filial(stream, seed, total_batches=total)
        # plain training on the rows that were streamed (each distinct row once), best of the epochs
        seen = torch.cat([yb for _, yb in batches(sl.x_train, sl.y_train, self.args.batch_size, total, seed)])
        distinct = min(len(sl.y_train), len(seen))
        x, y = model_input(sl.x_train[:distinct], ds.data_type), sl.y_train[:distinct]
        xt, yt = model_input(sl.x_test, ds.data_type), sl.y_test
        learner = self.settings(stream, seed).learner
        plain = {}
        for e in epochs:
            torch.manual_seed(seed)
            model = infer_architecture(ds.data_type, sl.x_train[:2], ds.num_classes, None).build().to(self.device)
            fit(model, x.to(self.device), y.to(self.device), epochs=e, lr=learner.learning_rate,
                batch_size=learner.train_batch_size, generator=torch.Generator().manual_seed(seed))
            plain[e] = accuracy(model, xt, yt)
            log(f"stationary: plain training, {e} epochs on {distinct} rows: {plain[e]:.4f}")
        self.matrices["stationary"] = {"columns": stream.columns, "order": stream.order,
                                       "filial": {"mean": run.matrix, "served": [run.served]}}
        return {"acc": _r(run.matrix[-1][0]), "plain_acc": _r(max(plain.values())),
                "plain_epochs": max(plain, key=plain.get), "spawns": run.counters.get("children_spawned"),
                "drift_events": run.counters.get("drift_events"), "batches": run.batches,
                "versions": run.versions, "seconds": _r(run.seconds, 1), "seed": seed}


def _stationary(bench: _Bench, ds, contenders: list[str], seeds: list[int], epochs: list[int]) -> dict | None:
    if "filial" not in contenders:
        log("stationary: skipped (it measures filial; add it to --contenders)")
        return None
    try:
        result = bench.stationary(ds, seeds[0], epochs)
    except Exception as exc:  # reported, as for the streams
        bench.errors.append(f"stationary filial seed {seeds[0]}: {type(exc).__name__}: {exc}")
        result = {"acc": None, "error": bench.errors[-1]}
    log(f"stationary: {result}")
    return result


def main(args: argparse.Namespace) -> dict:
    from benchmarks.cl_baselines import BASELINE_IMPL, BASELINES, avalanche_problem
    from benchmarks.cl_streams import build_stream

    t0 = time.perf_counter()
    profile = QUICK if args.quick else FULL
    seeds = _ints(args.seeds or profile["seeds"])
    epochs = _ints(args.epochs or profile["epochs"])
    rows_per_slice = args.rows_per_slice if args.rows_per_slice is not None else profile["rows_per_slice"]
    if args.stationary_batches is None:
        args.stationary_batches = profile["stationary_batches"]
    streams = _names(args.streams, STREAM_NAMES, "stream")
    contenders = _names(args.contenders, ("filial", *BASELINES), "contender")
    if not 0.0 <= args.baseline_label_smoothing < 1.0:
        raise SystemExit(f"filial bench cl: --baseline-label-smoothing must be in [0, 1), got "
                         f"{args.baseline_label_smoothing}")
    if any(c != "filial" for c in contenders) and (problem := avalanche_problem()):
        raise SystemExit(f"filial bench cl: {problem}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        logging.getLogger("filial").setLevel(logging.WARNING)  # one INFO line per batch would drown progress

    from tools.datasets import load_dataset

    ds = load_dataset("mnist5k") if set(streams) - {"tabular"} else None
    bench = _Bench(args, rows_per_slice)
    summary: dict[str, Any] = {
        "bench": "cl", "baseline_impl": BASELINE_IMPL if any(c != "filial" for c in contenders) else None,
        "streams": {}, "time_to_serve": {}, "drift_delay": {}, "stationary": None,
        "config": {"quick": args.quick, "seeds": seeds, "epochs": epochs, "rows_per_slice": rows_per_slice,
                   "batch_size": args.batch_size, "merge_every": args.merge_every,
                   "stationary_batches": args.stationary_batches, "ewc_lambda": args.ewc_lambda,
                   "lwf_alpha": args.lwf_alpha, "lwf_temperature": args.lwf_temperature,
                   "device": args.device, "threads": torch.get_num_threads(), "jobs": args.jobs}}
    built = {name: build_stream(name, ds, rows_per_slice) for name in streams if name != "stationary"}
    with contextlib.ExitStack() as stack:
        plans = bench.plan(stack, built, contenders, seeds, epochs, ds)
        if "filial" in contenders:
            from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis

            bench.servers = (stack.enter_context(EmbeddedKafka()), stack.enter_context(EmbeddedRedis()))
        results: dict[str, dict[str, Any]] = {}
        for name in streams:
            if name == "stationary":
                summary["stationary"] = _stationary(bench, ds, contenders, seeds, epochs)
                continue
            stream = built[name]
            log(f"stream {name}: slices {stream.columns}, {sum(len(s.y_train) for s in stream.slices)} train / "
                f"{sum(len(s.y_test) for s in stream.slices)} test rows")
            results[name] = bench.stream(stream, contenders, seeds)
        for name, stream in built.items():
            bench.baselines(stream, plans.get(name, {}), seeds, epochs, results[name])
            summary["streams"][name] = results[name]["contenders"]
            if results[name]["time_to_serve"] is not None:
                summary["time_to_serve"][name] = results[name]["time_to_serve"]
                summary["drift_delay"][name] = results[name]["drift_delay"]
    summary["errors"] = bench.errors
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        from benchmarks.cl_plot import plot

        plot(bench.matrices, summary, out_dir / "cl.png")
        summary["chart"] = str(out_dir / "cl.png")
    (out_dir / "cl.json").write_text(json.dumps({**summary, "matrices": bench.matrices}, indent=1))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
