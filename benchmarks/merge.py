"""``filial bench merge``: every merge method x granularity, and the controller's pick, on continual
streams (Split / Permuted / Rotated MNIST-5k); plus merge cost on a 10M-parameter model.

Protocol (MagMax's sequential fine-tuning): a base ``image_cnn`` is trained on slice 0; child t
(t = 1..T-1) starts from child t-1's weights and trains on slice t; every task vector is measured
from the ORIGINAL base. After each slice i the children available so far (1..i) are merged; the
merged model is scored on every slice's TEST split, giving the accuracy matrix ``R[i][j]`` (row 0 is
the base itself). Reported per row: average accuracy over slices after the last merge
(``mean_j R[T-1][j]``), the worst slice, forgetting (``mean_{j<T-1} max_{i<T-1} R[i][j] - R[T-1][j]``),
backward transfer (``mean_{j<T-1} R[T-1][j] - R[j][j]``) and the merge wall time.

Rows, each made by :func:`daemon.learn.merging.controller.choose_plan` as the engine would call it:
``<method>@model`` (``method=<method>, level="model"``: the method at its defaults, no search);
``<method>@group`` / ``<method>@layer`` (that method only, its lambda per group / per layer
searched over the scale grid); ``controller`` (``method="auto", level="auto"``: all methods,
scales and levels); ``seq_finetune`` (the last child, no merge: the forgetting reference). Every
choice is made on VALIDATION data (a split of each slice's training part, slices seen so far
only); every reported figure is on the test split, which no choice ever sees.

Scale: 10 children of a ~10M-parameter state dict (random tensors); each method's time to merge
them (:func:`daemon.learn.merging.plans.apply_plan`, a model-level plan) as a ratio to one
elementwise pass over the same 10 task vectors (``torch.stack(taus).sum(0)`` per tensor), the
memory-bound floor.

The last stdout line is one JSON object; a bar chart is written to ``<out-dir>/merge.png`` and the
JSON to ``<out-dir>/merge.json``. Run: ``python -m benchmarks.merge`` (or ``filial bench merge``).

Over 300 lines because it is one experiment end to end: the streams, the rows, the scale test and
the chart read best together.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from tools.datasets import load_dataset
from tools.scenarios import continual_stream
from benchmarks import progress
from daemon.learn.merging.controller import AUTO, choose_plan
from daemon.learn.merging.methods import METHODS
from daemon.learn.merging.plans import MODEL_UNIT, MergePlan, UnitPlan, apply_plan
from daemon.learn.models import ImageCNN
from daemon.learn.training import accuracy, fit, model_input

STREAMS = ("split", "permuted", "rotated")
GRANULARITIES = ("model", "group", "layer")


log = progress("merge")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist5k", help="bundled dataset (default mnist5k)")
    parser.add_argument("--streams", default=",".join(STREAMS), help="comma list of split,permuted,rotated")
    parser.add_argument("--slices", type=int, default=5, help="slices per stream (default 5)")
    parser.add_argument("--methods", default=",".join(METHODS), help="merge methods to compare")
    parser.add_argument("--width", type=int, default=8, help="image_cnn width (default 8)")
    parser.add_argument("--base-epochs", type=int, default=8, help="epochs on slice 0 (default 8)")
    parser.add_argument("--child-epochs", type=int, default=6, help="epochs per child (default 6)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: frugal on a shared machine; 0 leaves torch's)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each slice's training part held out for the controller (default 0.2)")
    parser.add_argument("--scales", default="0.5,1.0,1.5", help="lambda multipliers the search tries")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="controller min_gain (default: choose_plan's, 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-params", type=int, default=10_000_000,
                        help="parameters of the synthetic model for the merge-cost test (0 skips it)")
    parser.add_argument("--scale-children", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (minimum is reported)")
    parser.add_argument("--matrices", action="store_true", help="include every row's accuracy matrix")
    parser.add_argument("--out-dir", default="bench-results", help="where merge.png and merge.json go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")


# ---------------------------------------------------------------------------- metrics

def cl_metrics(R: list[list[float]], names: list[str]) -> dict:
    """Average accuracy, worst slice, forgetting and BWT from the accuracy matrix (module docstring)."""
    T = len(R)
    last = R[-1]
    worst = min(range(T), key=lambda j: last[j])
    forgetting = (sum(max(R[i][j] for i in range(T - 1)) - last[j] for j in range(T - 1)) / (T - 1)
                  if T > 1 else 0.0)
    bwt = sum(last[j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    return {"avg_acc": round(sum(last) / T, 4), "worst_acc": round(last[worst], 4),
            "worst_slice": names[worst], "forgetting": round(forgetting, 4), "bwt": round(bwt, 4),
            "final": {n: round(a, 4) for n, a in zip(names, last)}}


# ---------------------------------------------------------------------------- streams

class Stream:
    """A stream's slices as model inputs, with train / validation / test parts."""

    def __init__(self, kind: str, ds, slices: int, val_fraction: float, seed: int) -> None:
        self.kind = kind
        self.names, self.train, self.val, self.test = [], [], [], []
        gen = torch.Generator().manual_seed(seed + 17)
        for s in continual_stream(ds, kind, slices=slices, seed=seed):
            x, y = model_input(s.x_train, ds.data_type), s.y_train
            order = torch.randperm(len(x), generator=gen)
            n_val = int(len(x) * val_fraction)
            self.names.append(s.name)
            self.val.append((x[order[:n_val]], y[order[:n_val]]))
            self.train.append((x[order[n_val:]], y[order[n_val:]]))
            self.test.append((model_input(s.x_test, ds.data_type), s.y_test))


class Scorer:
    """Loads a state into one reusable model and scores it on slices."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.calls = 0

    def __call__(self, state, parts, names) -> dict[str, float]:
        self.model.load_state_dict(state)
        self.calls += 1
        return {n: accuracy(self.model, x, y) for n, (x, y) in zip(names, parts)}


def train_sequence(stream: Stream, args, num_classes: int) -> tuple[torch.nn.Module, dict, list[dict]]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = ImageCNN(num_classes=num_classes, width=args.width)
    x, y = stream.train[0]
    fit(model, x, y, epochs=args.base_epochs, lr=args.lr, batch_size=args.batch_size, generator=gen)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    children = []
    for t in range(1, len(stream.names)):
        x, y = stream.train[t]
        fit(model, x, y, epochs=args.child_epochs, lr=args.lr, batch_size=args.batch_size, generator=gen)
        children.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, base, children


# ---------------------------------------------------------------------------- rows

def row_specs(methods: list[str]) -> dict[str, dict]:
    """Row name -> the ``choose_plan`` arguments that make it (``method`` / ``level``)."""
    rows = {f"{m}@{level}": {"method": m, "level": level} for m in methods for level in GRANULARITIES}
    rows["controller"] = {"method": "auto", "level": "auto"}
    return rows


def run_stream(stream: Stream, args, num_classes: int, methods: list[str], scales: tuple[float, ...]) -> dict:
    t0 = time.perf_counter()
    model, base, children = train_sequence(stream, args, num_classes)
    train_s = time.perf_counter() - t0
    scorer = Scorer(model)
    names, T = stream.names, len(stream.names)
    test = lambda state: scorer(state, stream.test, names)  # noqa: E731
    base_row = test(base)
    R_ft = [list(base_row.values())] + [list(test(c).values()) for c in children]
    out_rows: dict = {"seq_finetune": {**cl_metrics(R_ft, names), "merge_s": 0.0, "plan": "last child, no merge"}}
    log(f"{stream.kind:8s} {'seq_finetune':24s} avg {out_rows['seq_finetune']['avg_acc']:.4f} "
        f"worst {out_rows['seq_finetune']['worst_acc']:.4f} forget {out_rows['seq_finetune']['forgetting']:+.4f} "
        f"(no merge; trained {train_s:.1f} s)")
    if args.matrices:
        out_rows["seq_finetune"]["R"] = [[round(v, 4) for v in r] for r in R_ft]
    extra = {} if args.min_gain is None else {"min_gain": args.min_gain}
    for row, choice in row_specs(methods).items():
        pinned = choice["method"] != AUTO and choice["level"] == "model"
        R = [list(base_row.values())]
        total_s = 0.0
        for i in range(1, T):
            seen = list(range(i + 1))
            # choices are made on the validation split of the slices seen so far, never on test
            validate = lambda s, seen=seen: scorer(s, [stream.val[j] for j in seen],  # noqa: E731
                                                   [names[j] for j in seen])
            start = time.perf_counter()
            # "<method>@model" is the method at its defaults (pinned, no search); "<method>@group|layer"
            # searches that method's lambda per unit; "controller" searches everything
            result = choose_plan(base, children[:i], [1.0] * i, None if pinned else validate, scales=scales,
                                 **choice, **extra)
            total_s += time.perf_counter() - start
            R.append(list(test(result.state).values()))
        rec = {**cl_metrics(R, names), "merge_s": round(result.merge_seconds, 5),
               "search_s": round(result.search_seconds, 4), "wall_s_all_merges": round(total_s, 4),
               "evaluations": result.evaluations, "plan": result.plan.label()}
        if not pinned:
            # validation mean of the pick vs the baseline candidate (scored first) at the last merge
            rec.update(val_mean_pick=round(result.score.mean, 4), val_mean_baseline=round(result.candidates[0].mean, 4))
        if row == "controller":
            rec["plan_detail"] = result.plan.to_dict()
        if args.matrices or row in ("controller", "average@model"):
            rec["R"] = [[round(v, 4) for v in r] for r in R]
        out_rows[row] = rec
        log(f"{stream.kind:8s} {row:24s} avg {rec['avg_acc']:.4f} worst {rec['worst_acc']:.4f} "
            f"forget {rec['forgetting']:+.4f} merge {rec['merge_s'] * 1e3:6.1f} ms search {rec['search_s']:5.2f} s "
            f"({rec['evaluations']} evals)  {rec['plan']}")
    ctl, avg = out_rows["controller"], out_rows["average@model"]
    return {"slices": names, "train_s": round(train_s, 2), "base_acc": {k: round(v, 4) for k, v in base_row.items()},
            "rows": out_rows,
            "controller_vs_average": {"delta_avg_acc": round(ctl["avg_acc"] - avg["avg_acc"], 4),
                                      "delta_worst_acc": round(ctl["worst_acc"] - avg["worst_acc"], 4),
                                      "ok": ctl["avg_acc"] >= avg["avg_acc"]},
            "wall_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------- scale

def synthetic_state(params: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A ~``params``-parameter MLP-shaped state dict (4 weight matrices + biases)."""
    d = max(int(math.sqrt(params / 8.6)), 8)  # 4 matrices: d*2d + 2d*2d + 2d*d + d*0.6d ~= 8.6 d^2 (+ biases)
    shapes = {"stages.0.weight": (2 * d, d), "stages.0.bias": (2 * d,),
              "stages.1.weight": (2 * d, 2 * d), "stages.1.bias": (2 * d,),
              "stages.2.weight": (d, 2 * d), "stages.2.bias": (d,),
              "head.weight": (max(int(0.6 * d), 1), d), "head.bias": (max(int(0.6 * d), 1),)}
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_scale(args, methods: list[str]) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    base = synthetic_state(args.scale_params, gen)
    n_params = sum(t.numel() for t in base.values())
    children = [{k: t + 0.01 * torch.randn(t.shape, generator=gen) for k, t in base.items()}
                for _ in range(args.scale_children)]
    taus = [{k: c[k] - base[k] for k in base} for c in children]

    def one_pass():
        for k in base:
            torch.stack([tau[k] for tau in taus]).sum(0)

    floor = best_of(one_pass, args.repeats)
    out = {"params": n_params, "children": args.scale_children, "threads": torch.get_num_threads(),
           "elementwise_pass_s": round(floor, 4), "methods": {}}
    for m in methods:
        plan = MergePlan("model", {MODEL_UNIT: UnitPlan(m)})
        s = best_of(lambda: apply_plan(plan, base, children), args.repeats)
        out["methods"][m] = {"merge_s": round(s, 4), "ratio": round(s / floor, 2)}
        log(f"scale    {m:16s} {s:.3f} s  = {s / floor:.1f} x one elementwise pass ({floor:.3f} s)")
    # a mixed layer-level plan (what the controller may pick) costs the sum of its units
    plan = MergePlan("layer", {"stages.0": UnitPlan("ties"), "stages.1": UnitPlan("magmax"),
                               "stages.2": UnitPlan("average"), "head": UnitPlan("task_arithmetic")})
    s = best_of(lambda: apply_plan(plan, base, children), args.repeats)
    out["methods"]["layer_plan_mixed"] = {"merge_s": round(s, 4), "ratio": round(s / floor, 2)}
    log(f"scale    layer_plan_mixed {s:.3f} s  = {s / floor:.1f} x")
    return out


# ---------------------------------------------------------------------------- chart

def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(summary["streams"])
    rows = list(next(iter(summary["streams"].values()))["rows"])
    fig, ax = plt.subplots(figsize=(max(10, 0.75 * len(rows) * len(streams) / 2), 5))
    width = 0.8 / len(streams)
    for si, name in enumerate(streams):
        data = summary["streams"][name]["rows"]
        xs = [i + si * width for i in range(len(rows))]
        ax.bar(xs, [data[r]["avg_acc"] for r in rows], width, label=f"{name} avg")
        ax.scatter(xs, [data[r]["worst_acc"] for r in rows], marker="_", color="black", s=60, zorder=3,
                   label="worst slice" if si == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels(rows, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy after the last merge (mean over slices)")
    ax.set_ylim(0, 1)
    ax.set_title(f"filial bench merge: {summary['config']['dataset']}, {summary['config']['slices']} slices")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown merge method {m!r}; known: {sorted(METHODS)}")
    if "average" not in methods:
        raise SystemExit("--methods must include 'average' (the baseline the controller must match)")
    scales = tuple(float(s) for s in args.scales.split(","))
    ds = load_dataset(args.dataset)
    summary: dict = {"bench": "merge", "config": {
        "dataset": args.dataset, "slices": args.slices, "streams": streams, "methods": methods,
        "family": "image_cnn", "width": args.width, "base_epochs": args.base_epochs,
        "child_epochs": args.child_epochs, "batch_size": args.batch_size, "lr": args.lr,
        "threads": torch.get_num_threads(), "val_fraction": args.val_fraction,
        "scales": list(scales), "min_gain": args.min_gain, "seed": args.seed,
        "weights": "uniform (1 per child)", "choices_on": "validation split", "figures_on": "test split"},
        "streams": {}}
    for kind in streams:
        log(f"stream {kind}: training base + {args.slices - 1} sequential children")
        stream = Stream(kind, ds, args.slices, args.val_fraction, args.seed)
        summary["streams"][kind] = run_stream(stream, args, ds.num_classes, methods, scales)
    summary["controller_ge_average"] = {k: v["controller_vs_average"]["ok"] for k, v in summary["streams"].items()}
    if args.scale_params > 0:
        log(f"scale: {args.scale_children} children of ~{args.scale_params:,} parameters")
        summary["scale"] = run_scale(args, methods)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.no_plot:
        plot(summary, out_dir / "merge.png")
        summary["chart"] = str(out_dir / "merge.png")
    (out_dir / "merge.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="filial bench merge", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
