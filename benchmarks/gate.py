"""``python -m benchmarks.gate``: the publish gate's defaults, measured: how far a slice moves
between two equally good models, and what :func:`daemon.learn.merging.gate.paired_gate` does with it.

Equally good models: on each stream (MNIST-5k Rotated, Permuted, Split; 5 slices; 40 % of each
slice's rows held out as test rows no model trains on, about 400 per slice), ``--seeds`` ``image_cnn``
models are trained jointly on all slices' train rows to a plateau (``--epochs``), the same rows and
recipe, another init and data order per seed ("seed" pairs: every two of them); each is then
trained one epoch more ("continuation" pairs: a model and its own continuation, the change a gate
sees most). Every slice's test rows are cut into disjoint chunks of ``--chunks`` rows; on every
chunk of every slice, for every pair in both directions, the paired difference
``d = candidate - served`` on the same rows is the null distribution the tolerance must live with.
Reported per pair kind and chunk size (``null``):

- ``sd``, ``abs_q95``, ``abs_q99``, ``abs_max``: spread of ``d``;
- ``true_sd``: the per-slice movement that is not sampling noise, ``sqrt(mean d^2 - mean v)`` with
  ``v = ((g + l)/n - d^2)/(n - 1)`` the unbiased paired sampling variance of each ``d``
  (``sampling_sd = sqrt(mean v)``); ``trade_sd``: spread of ``d`` minus the pair's mean over slices;
- ``guard_false_rejections``: per ``tolerance@guard_alpha``, the share of slice-chunks the per-slice
  guard calls a regression (nobody regressed: every one is a false rejection);
- ``published`` / ``published_worse``: per ``alpha``, the share of stream-level gate calls (all
  slices' k-th chunks, guard off) that publish, and that publish a candidate which is worse than
  the served model on all (about 2,000) test rows of the stream.
``<kind>@overall``: how equal the pairs are (overall accuracy difference on all test rows).

``power`` (simulated, seeded): the share of draws in which a planted regression 0.95 -> 0.80 (in
expectation) is caught by the guard at 75 and 150 rows, per ``tolerance@guard_alpha``; and the share
in which a new slice (0.2 -> 0.9) at a cost of -0.01 on two other slices (150 rows each) is published.

Progress on stderr; the last stdout line is one JSON object. ``--cache FILE`` keeps the models'
per-row correctness (safetensors) so the analysis reruns in seconds. About 30 minutes on 2 CPU
cores. Needs the ``tools`` extra (datasets). Not a ``filial bench`` subcommand (yet): run it with
``python -m benchmarks.gate``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks import progress
from daemon.learn.merging.gate import DEFAULT_ALPHA, DEFAULT_GUARD_ALPHA, paired_gate
from daemon.learn.models import infer_architecture
from daemon.learn.training import fit, model_input, predict_logits
from tools.datasets import load_dataset
from tools.scenarios import continual_stream

log = progress("gate")
TOLERANCES = (0.0, 0.02, 0.03, 0.05, 0.08)
GUARD_ALPHAS = (0.05, 0.1, 0.2)
ALPHAS = (0.05, 0.1, 0.2, 0.5)
GRID = [(t, ga) for ga in GUARD_ALPHAS for t in TOLERANCES]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist5k", help="bundled dataset (default: %(default)s)")
    parser.add_argument("--streams", nargs="+", default=["rotated", "permuted", "split"])
    parser.add_argument("--seeds", type=int, default=4, help="equally good models per stream")
    parser.add_argument("--epochs", type=int, default=15, help="joint training epochs per model (to a plateau)")
    parser.add_argument("--test-fraction", type=float, default=0.4, help="share of each slice held out")
    parser.add_argument("--chunks", type=int, nargs="+", default=[100, 150, 250], help="judge rows per slice")
    parser.add_argument("--draws", type=int, default=2000, help="simulated draws for the power figures")
    parser.add_argument("--cache", default=None, help="safetensors file of the models' per-row correctness: "
                        "read if it exists (no training), else written")


def _models(stream, arch, args) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per-row correctness on every slice's test rows: {"seed": [per seed], "continued": [per seed]}."""
    x = torch.cat([model_input(s.x_train, "image") for s in stream])
    y = torch.cat([s.y_train for s in stream])
    tests = {s.name: (model_input(s.x_test, "image"), s.y_test) for s in stream}

    def correct(model):
        return {name: predict_logits(model, tx).argmax(1) == ty for name, (tx, ty) in tests.items()}

    out: dict[str, list] = {"seed": [], "continued": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = arch.build()
        fit(model, x, y, epochs=args.epochs, lr=1e-3, generator=torch.Generator().manual_seed(seed))
        out["seed"].append(correct(model))
        fit(model, x, y, epochs=1, lr=1e-3, generator=torch.Generator().manual_seed(10_000 + seed))
        out["continued"].append(correct(model))
    return out


def _unflatten(flat: dict[str, torch.Tensor], stream: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in sorted(flat.items()):
        kind_stream, kind, seed, name = key.split("/", 3)
        if kind_stream == stream:
            out.setdefault(kind, {}).setdefault(int(seed), {})[name] = value
    return {kind: [per[i] for i in sorted(per)] for kind, per in out.items()}


def _pairs(models):
    for i, j in itertools.combinations(range(len(models["seed"])), 2):
        yield "seed", models["seed"][i], models["seed"][j]
    for i in range(len(models["seed"])):
        yield "continuation", models["seed"][i], models["continued"][i]


def _quantile(values: list[float], q: float) -> float:
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item() if values else float("nan")


def _null(all_models, args) -> dict:
    obs: dict[tuple[str, int], dict] = {}
    overall: dict[str, list[float]] = {}
    for models in all_models:
        for kind, a_all, b_all in _pairs(models):
            overall.setdefault(kind, []).append(
                sum((b_all[s].float().mean() - a_all[s].float().mean()).item() for s in a_all) / len(a_all))
            for served, cand in ((a_all, b_all), (b_all, a_all)):
                full_diff = sum((cand[s].float().mean() - served[s].float().mean()).item() for s in served)
                for n in args.chunks:
                    acc = obs.setdefault((kind, n), {"d": [], "v": [], "centred": [], "calls": 0,
                                                      "reject": {tg: 0 for tg in GRID},
                                                      "publish": {a: 0 for a in ALPHAS},
                                                      "publish_worse": {a: 0 for a in ALPHAS}, "slices": 0})
                    chunks = min(len(v) for v in served.values()) // n
                    for k in range(chunks):
                        sa = {s: v[k * n:(k + 1) * n] for s, v in served.items()}
                        sb = {s: v[k * n:(k + 1) * n] for s, v in cand.items()}
                        ds = []
                        for s in sa:
                            g, l = int((sb[s] & ~sa[s]).sum()), int((sa[s] & ~sb[s]).sum())
                            d = (g - l) / n
                            ds.append(d)
                            acc["d"].append(d)
                            acc["v"].append(((g + l) / n - d * d) / (n - 1))
                        acc["centred"].extend(d - sum(ds) / len(ds) for d in ds)
                        acc["slices"] += len(sa)
                        for t, ga in GRID:
                            acc["reject"][t, ga] += len(paired_gate(sa, sb, tolerance=t, guard_alpha=ga).regressions)
                        for a in ALPHAS:
                            published = paired_gate(sa, sb, alpha=a, tolerance=1.0).accepted
                            acc["publish"][a] += published
                            acc["publish_worse"][a] += published and full_diff < 0
                        acc["calls"] += 1
    table = {}
    for (kind, n), acc in sorted(obs.items()):
        d, v = acc["d"], acc["v"]
        mean_sq = sum(x * x for x in d) / len(d)
        table[f"{kind}@{n}"] = {
            "pair_kind": kind, "rows": n, "slice_chunks": acc["slices"], "gate_calls": acc["calls"],
            "sd": round(math.sqrt(mean_sq), 4),
            "abs_q95": round(_quantile([abs(x) for x in d], 0.95), 4),
            "abs_q99": round(_quantile([abs(x) for x in d], 0.99), 4),
            "abs_max": round(max(abs(x) for x in d), 4),
            "sampling_sd": round(math.sqrt(sum(v) / len(v)), 4),
            "true_sd": round(math.sqrt(max(mean_sq - sum(v) / len(v), 0.0)), 4),
            "trade_sd": round(math.sqrt(sum(x * x for x in acc["centred"]) / len(acc["centred"])), 4),
            "guard_false_rejections": {f"{t}@{ga}": round(acc["reject"][t, ga] / acc["slices"], 4) for t, ga in GRID},
            "published": {str(a): round(acc["publish"][a] / acc["calls"], 4) for a in ALPHAS},
            "published_worse": {str(a): round(acc["publish_worse"][a] / acc["calls"], 4) for a in ALPHAS},
        }
    for kind, diffs in overall.items():
        table[f"{kind}@overall"] = {"pair_kind": kind, "pairs": len(diffs),
                                    "abs_overall_diff_max": round(max(abs(x) for x in diffs), 4),
                                    "abs_overall_diff_mean": round(sum(abs(x) for x in diffs) / len(diffs), 4)}
    return table


def _pair_draw(n: int, p_served: float, p_candidate: float, gen: torch.Generator):
    """Served correct ~ Bernoulli(p_served); the candidate fixes 30 % of the served model's errors
    (when it gets worse) or keeps 97 % of its right rows (when it gets better), and is otherwise
    set so its expected accuracy is ``p_candidate``."""
    a = torch.rand(n, generator=gen) < p_served
    u = torch.rand(n, generator=gen)
    if p_candidate <= p_served:
        fix = 0.3
        keep = max(min((p_candidate - (1 - p_served) * fix) / p_served, 1.0), 0.0)
    else:
        keep = 0.97 if p_served > 0 else 1.0
        fix = max(min((p_candidate - p_served * keep) / max(1 - p_served, 1e-9), 1.0), 0.0)
    b = torch.where(a, u < keep, u < fix)
    return a, b


def _power(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    out: dict = {"regression_0.95_to_0.80": {}, "new_slice_0.2_to_0.9": {}}
    for n in (75, 150):
        caught = {tg: 0 for tg in GRID}
        for _ in range(args.draws):
            a, b = _pair_draw(n, 0.95, 0.80, gen)
            for t, ga in GRID:
                caught[t, ga] += bool(paired_gate({"s": a}, {"s": b}, tolerance=t, guard_alpha=ga).regressions)
        out["regression_0.95_to_0.80"][str(n)] = {f"{t}@{ga}": round(c / args.draws, 4)
                                                  for (t, ga), c in caught.items()}
    published, zs = 0, []
    for _ in range(args.draws):
        served, cand = {}, {}
        served["new"], cand["new"] = _pair_draw(150, 0.2, 0.9, gen)
        for s in ("old1", "old2"):
            served[s], cand[s] = _pair_draw(150, 0.9, 0.89, gen)
        v = paired_gate(served, cand)
        published += v.accepted
        zs.append(v.z)
    out["new_slice_0.2_to_0.9"] = {"published": round(published / args.draws, 4),
                                   "z_median": round(_quantile(zs, 0.5), 2), "z_q05": round(_quantile(zs, 0.05), 2)}
    return out


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    ds = load_dataset(args.dataset)
    arch = infer_architecture(ds.data_type, ds.x[:1], ds.num_classes, None)
    cached = load_file(args.cache) if args.cache and Path(args.cache).exists() else None
    all_models, accuracy, flat = [], {}, {}
    for kind in args.streams:
        if cached is not None:
            models = _unflatten(cached, kind)
        else:
            stream = continual_stream(ds, kind, slices=5, seed=0, test_fraction=args.test_fraction)
            log(f"{kind}: training {args.seeds} models for {args.epochs} epochs on "
                f"{sum(len(s.y_train) for s in stream)} rows, {min(len(s.y_test) for s in stream)}+ test rows per slice")
            models = _models(stream, arch, args)
            flat.update({f"{kind}/{k}/{i}/{s}": v for k, ms in models.items() for i, m in enumerate(ms)
                         for s, v in m.items()})
        all_models.append(models)
        accuracy[kind] = {k: [round(sum(int(v.sum()) for v in m.values()) / sum(len(v) for v in m.values()), 4)
                              for m in ms] for k, ms in models.items()}
        log(f"{kind}: test accuracy per seed {accuracy[kind]['seed']}")
    if args.cache and cached is None:
        save_file(flat, args.cache)
    null = _null(all_models, args)
    for key, row in null.items():
        if "sd" not in row:
            log(f"{key}: {row}")
            continue
        log(f"{key}: sd {row['sd']} |d| q95 {row['abs_q95']} q99 {row['abs_q99']} max {row['abs_max']} "
            f"true_sd {row['true_sd']} trade_sd {row['trade_sd']} guard false rejections {row['guard_false_rejections']} "
            f"published {row['published']} published worse {row['published_worse']}")
    power = _power(args)
    log(f"power: {power}")
    return {"dataset": args.dataset, "streams": args.streams, "seeds": args.seeds, "epochs": args.epochs,
            "alpha": DEFAULT_ALPHA, "guard_alpha": DEFAULT_GUARD_ALPHA, "accuracy": accuracy, "null": null,
            "power": power, "seconds": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())), file=sys.stdout)
