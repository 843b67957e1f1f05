"""``filial bench hkt``: compact children by HKT vs scratch, KD and Child-Tuning; inherit or not?

Hereditary Knowledge Transfer against training from scratch, Hinton distillation and Child-Tuning on
continual streams, and the spawn-policy question (does inheriting still help at high drift?).

Protocol. For each task (a dataset + model family + stream: Split / Permuted / Rotated MNIST-5k
with ``image_cnn``, the same streams of scikit-learn digits with ``tabular_mlp``, and a ``mild``
stream of small rotations / pixel noise so that low-KL slices exist too), a parent of width ``W``
is trained on slice 0. For every later slice, children are trained on that slice's training part
with the SAME budget (same epochs, batch size, mini-batch order, Adam lr):

- ``hkt``: a child of width ``W * ratio`` (default half) from :func:`daemon.learn.inherit.spawn.spawn_child`
  as the engine spawns it (the authors' Genetic Attention and three-term loss, alpha 0.6,
  penultimate stage, :class:`daemon.learn.inherit.hkt.HKTLoss`; started from the parent's leading
  channels, the head only for classes the parent knows: ``inherit=auto``);
- ``scratch``: the same compact child, cross-entropy only;
- ``kd``: the same compact child, Hinton KD from the parent (T = 4, 0.5 CE + 0.5 T² KL);
- ``ct``: Child-Tuning (task-driven, Fisher top 30 %) of a full-size copy of the parent;
- ``copy`` / ``scratch_full``: a full-size copy of the parent fine-tuned, and a full-size child
  from scratch: the same-size side of the spawn-policy question.

Variants are written ``name:key=value,...``, e.g. ``hkt:alpha=0.9``, ``hkt:stages=all``,
``hkt:gates=1``, ``hkt:weights=1/1/0``, ``hkt:inherit=none`` (the authors' loss on a fresh child),
``ct:mode=bernoulli,p=0.3``, ``kd:t=2,alpha=0.9,beta=0.1``, ``scratch:inherit=auto`` (HKT's
weight inheritance without its loss), ``copy:inherit=auto`` (copy; the head only for known
classes). Defaults: ``hkt, hkt:weights=1/1/0, scratch, scratch:inherit=auto, kd, ct, copy,
copy:inherit=auto, scratch_full``. The variants (loss weights, learned gates, inheritance modes)
live here, not in the daemon: :class:`HKTVariant` and :func:`inherit_variant` build them from the
daemon's parts, and every method trains through the daemon's one loop,
:func:`daemon.learn.training.fit`.

Reported per slice and method: held-out (test split) accuracy after each of ``--eval-epochs``
(default 1, 2, 5) as mean ± std over ``--seeds`` seeds; per method the parameter count and CPU
inference latency of its architecture (1 thread; batch-1 median and a batch of 256, best of 3).
Per slice: the parent's accuracy before any training, the share of the slice's classes the parent
knows (:func:`daemon.learn.inherit.spawn.known_classes`) and the drift KL of the slice against the parent's
reference with the project's detector (:class:`daemon.learn.drift.FeatureKL`: parent penultimate features, 8 PCA
components, reference = 512 rows of slice 0, batches of 100 rows, mean over the slice's batches).

The spawn-policy table groups slices by what the engine can measure at spawn time (KL below or
above ``--kl-threshold``; the parent knows the classes or not) and gives, for a compact and for a
same-size child, every method's mean accuracy and the best one.

Subsampled to stay within ~12 min on a shared 2-core machine: 3 slices per stream (2 child slices),
500 training rows per slice, 3 seeds (``--slices 5 --max-train 0`` for the full streams). The last
stdout line is one JSON object; ``<out-dir>/hkt.json`` and the learning-curve plot
``<out-dir>/hkt.png`` are written. Run: ``filial bench hkt`` (or ``python -m benchmarks.hkt``).

Over 300 lines because it is one experiment end to end: the method variants it ablates, the
streams, the runs, the spawn-policy table and the plot read best together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tools.datasets import load_dataset
from tools.scenarios import Slice, continual_stream, parse_phase
from benchmarks import progress
from daemon.learn.drift import FeatureKL
from daemon.learn.inherit.hkt import HKTLoss, channels_and_size
from daemon.learn.inherit.spawn import (compact_architecture, fresh_like, inherit_for_spawn, inherit_weights,
                                        known_classes, spawn_child)
from daemon.learn.merging.distill import KnowledgeDistillation
from daemon.learn.models import Architecture, parameter_count
from daemon.learn.training import EpochCallback, accuracy, embed, fit, model_input

STREAMS = ("split", "permuted", "rotated", "mild")
DEFAULT_METHODS = ("hkt,hkt:weights=1/1/0,scratch,scratch:inherit=auto,kd,ct,copy,copy:inherit=auto,"
                   "scratch_full")
COMPACT = ("hkt", "scratch", "kd")        # methods whose child has the compact architecture
FULL = ("ct", "copy", "scratch_full")     # methods whose child has the parent's architecture
# task name -> (dataset, family, parent width); digits run as flat tabular features
TASKS = {"mnist5k": ("mnist5k", "image_cnn", 16), "digits": ("digits", "tabular_mlp", 64),
         "digits_cnn": ("digits", "image_cnn", 16)}


log = progress("hkt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="mnist5k,digits",
                        help="comma list of mnist5k (image_cnn), digits (tabular_mlp), digits_cnn (image_cnn on 8x8)")
    parser.add_argument("--streams", default=",".join(STREAMS),
                        help="comma list of split,permuted,rotated,mild (mild: rotate 10/-15, noise 40/80)")
    parser.add_argument("--slices", type=int, default=3,
                        help="slices per stream; the parent learns slice 0 (default 3: two child slices)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma list (default {DEFAULT_METHODS}); variants as name:key=value,key=value "
                             "(a comma followed by a method name starts the next method)")
    parser.add_argument("--ratio", type=float, default=0.5, help="compact child width / parent width")
    parser.add_argument("--parent-epochs", type=int, default=8, help="parent epochs on slice 0 (default 8)")
    parser.add_argument("--eval-epochs", default="1,2,5", help="held-out accuracy after these epochs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (parent, children, batch order)")
    parser.add_argument("--max-train", type=int, default=500, help="training rows per slice (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-threshold", type=float, default=0.5, help="high/low KL split of the policy table")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 leaves torch's)")
    parser.add_argument("--out-dir", default="bench-results")
    parser.add_argument("--name", default="hkt", help="file stem of the JSON and PNG (default hkt)")
    parser.add_argument("--no-plot", action="store_true")


# ---------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class MethodSpec:
    label: str
    kind: str
    options: tuple[tuple[str, str], ...] = ()

    def opt(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


KINDS = ("hkt", "scratch", "kd", "ct", "copy", "scratch_full")


def parse_methods(text: str) -> list[MethodSpec]:
    specs = []
    for part in (p.strip() for p in _split_plain(text)):
        if not part:
            continue
        kind, _, rest = part.partition(":")
        if kind not in KINDS:
            raise SystemExit(f"unknown method {kind!r}; known: {', '.join(KINDS)}")
        options = tuple(tuple(kv.split("=", 1)) for kv in rest.split(",") if kv) if rest else ()
        for kv in options:
            if len(kv) != 2:
                raise SystemExit(f"method option {kv!r} in {part!r} must be key=value")
        specs.append(MethodSpec(part, kind, options))  # type: ignore[arg-type]
    return specs


def _split_plain(text: str) -> list[str]:
    """Split ``a,b:x=1,y=2,c`` at the commas that start a new method (a known kind follows)."""
    out: list[str] = []
    for token in text.split(","):
        head = token.split(":", 1)[0].strip()
        if head in KINDS or not out:
            out.append(token)
        else:
            out[-1] += "," + token
    return out


INHERIT_MODES = ("none", "stages", "all", "auto")
GATE_LR_FACTOR = 10.0   # a spawn trains for a few epochs only: gates at the base lr barely leave alpha0


class ChannelGates(nn.Module):
    """Learned per-channel alpha in (0, 2*alpha0), starting at alpha0 (``hkt:gates=1``)."""

    def __init__(self, channels: int, alpha: float, ndim: int) -> None:
        super().__init__()
        self.alpha0 = alpha
        self.logit = nn.Parameter(torch.zeros(channels))
        self.ndim = ndim

    def forward(self) -> torch.Tensor:
        a = 2 * self.alpha0 * torch.sigmoid(self.logit)
        if self.ndim == 4:
            return a.view(1, -1, 1, 1)
        if self.ndim == 3:
            return a.view(1, 1, -1)
        return a.view(1, -1)


class HKTVariant(HKTLoss):
    """The daemon's HKT loss with the knobs this bench ablates: the three terms' ``weights`` (a zero
    reverse weight drops the reverse-mix pass and its projections) and learned per-channel
    ``gates`` in place of the fixed alpha (trained at ``lr * GATE_LR_FACTOR``)."""

    def __init__(self, parent: nn.Module, *, stages: tuple[int, ...] | None, alpha: float,
                 weights: tuple[float, ...], gates: bool, lr: float) -> None:
        super().__init__(parent, stages=stages, alpha=alpha)
        if len(weights) != 3 or any(w < 0 for w in weights):
            raise SystemExit(f"HKT weights must be three non-negative numbers, got {weights!r}")
        self.weights, self.reverse, self.gates, self.lr = weights, weights[2] > 0, gates, lr

    @contextmanager
    def bind(self, model: nn.Module, x: torch.Tensor) -> Iterator[list]:
        with super().bind(model, x) as params:
            if self.gates:
                p_shapes, c_shapes = self.shapes
                device = next(model.parameters()).device
                self.gates_fwd = nn.ModuleDict({str(k): ChannelGates(channels_and_size(c_shapes[k])[0], self.alpha,
                                                                     len(c_shapes[k]) + 1)
                                                for k in self.stages}).to(device)
                self.gates_rev = nn.ModuleDict({str(k): ChannelGates(channels_and_size(p_shapes[k])[0], self.alpha,
                                                                     len(p_shapes[k]) + 1)
                                                for k in self.stages}).to(device)
                params = params + [{"params": [*self.gates_fwd.parameters(), *self.gates_rev.parameters()],
                                    "lr": self.lr * GATE_LR_FACTOR}]
            yield params

    def alpha_at(self, direction: str, stage: int) -> float | torch.Tensor:
        if not self.gates:
            return self.alpha
        return (self.gates_fwd if direction == "fwd" else self.gates_rev)[str(stage)]()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.terms(model, x, y)
        w = self.weights
        out["total"] = w[0] * out["child"] + w[1] * out["mix"] + (w[2] * out["reverse"] if "reverse" in out else 0)
        return out


def hkt_variant(spec: MethodSpec, parent: nn.Module, lr: float) -> HKTVariant:
    """``stages``: ``default`` | ``all`` | indices joined by ``/``; ``weights``: three numbers joined
    by ``/`` (a zero reverse weight drops the reverse-mix pass)."""
    stages = spec.opt("stages", "default")
    if stages == "default":
        chosen = None
    elif stages == "all":
        chosen = tuple(range(len(parent.stages)))
    else:
        chosen = tuple(int(s) for s in stages.split("/"))
    weights = tuple(float(w) for w in spec.opt("weights", "1/1/1").split("/"))
    return HKTVariant(parent, stages=chosen, alpha=float(spec.opt("alpha", "0.6")), weights=weights,
                      gates=spec.opt("gates", "0") in ("1", "true"), lr=lr)


def inherit_variant(parent: nn.Module, child: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> list[str]:
    """A new child's start: ``none``, ``stages`` (the parent's feature blocks), ``all`` (blocks and
    head) or ``auto`` (the daemon's :func:`inherit_for_spawn`: the head only for known classes)."""
    if mode not in INHERIT_MODES:
        raise SystemExit(f"inherit must be one of {', '.join(INHERIT_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    if mode == "auto":
        return inherit_for_spawn(parent, child, x, y)
    return inherit_weights(parent, child, ("stages.",) if mode == "stages" else ("stages.", "head."))


# ---------------------------------------------------------------------------- data

@dataclass
class SliceData:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Task:
    name: str
    stream: str
    arch: Architecture
    slices: list[SliceData] = field(default_factory=list)


# Mild shifts of known classes, so the policy table has low-KL slices too (the standard streams'
# later slices all measure KL >= 0.5 against a parent of slice 0).
MILD_PHASES = ("base=identity", "rot10=rotate:10", "noise40=noise:40", "rot-15=rotate:-15", "noise80=noise:80")


def mild_stream(ds, slices: int, seed: int = 0, test_fraction: float = 0.2) -> list[Slice]:
    """Like :func:`tools.scenarios.continual_stream`: disjoint shares, each with a held-out part."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.x), generator=gen)
    x, y = ds.x[order], ds.y[order]
    share = len(x) // slices
    out = []
    for i, text in enumerate(MILD_PHASES[:slices]):
        phase = parse_phase(text)
        xi, yi = phase.apply(x[i * share:(i + 1) * share], y[i * share:(i + 1) * share])
        idx = torch.randperm(len(xi), generator=gen)
        n_test = int(len(xi) * test_fraction)
        out.append(Slice(phase.name, xi[idx[n_test:]], yi[idx[n_test:]], xi[idx[:n_test]], yi[idx[:n_test]]))
    return out


def build_task(task: str, stream: str, args) -> Task:
    ds_name, family, width = TASKS[task]
    ds = load_dataset(ds_name)
    slices = []
    raw = mild_stream(ds, args.slices) if stream == "mild" else continual_stream(ds, stream, slices=args.slices, seed=0)
    for s in raw:
        x, y = model_input(s.x_train, ds.data_type), s.y_train
        xt = model_input(s.x_test, ds.data_type)
        if family == "tabular_mlp":
            x, xt = x.flatten(1), xt.flatten(1)
        if args.max_train > 0:
            x, y = x[:args.max_train], y[:args.max_train]
        slices.append(SliceData(s.name, x, y, xt, s.y_test))
    shape = slices[0].x.shape[1:]
    params: dict = {"num_classes": ds.num_classes, "width": width}
    if family == "image_cnn":
        params.update(in_channels=1, image_size=int(shape[-1]))
    else:
        params.update(in_features=int(shape[0]))
    return Task(f"{task}/{stream}", stream, Architecture(family=family, params=params), slices)


# ---------------------------------------------------------------------------- training

def run_method(spec: MethodSpec, parent: nn.Module, task: Task, sl: SliceData, args, seed: int,
               eval_epochs: list[int]) -> tuple[dict[int, float], nn.Module, float]:
    """Train one child; returns held-out accuracy after each eval epoch, the child, and seconds."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    epochs = max(eval_epochs)
    accs: dict[int, float] = {}

    def on_epoch(epoch, child, _losses):
        if epoch in eval_epochs:
            accs[epoch] = accuracy(child, sl.x_test, sl.y_test)

    compact = compact_architecture(task.arch, args.ratio)
    start = time.perf_counter()
    hooks = [EpochCallback(on_epoch)]
    common = dict(epochs=epochs, lr=args.lr, batch_size=args.batch_size, generator=gen)
    if spec.kind == "hkt" and not spec.options:
        child = spawn_child(parent, compact, sl.x, sl.y, method="hkt", hooks=hooks, **common)
    elif spec.kind == "hkt":
        # as spawn_child's "hkt" does, with this bench's variant of the start and of the loss
        child = compact.build().to(next(parent.parameters()).device)
        inherit_variant(parent, child, sl.x, sl.y, spec.opt("inherit", "auto"))
        fit(child, sl.x, sl.y, loss=hkt_variant(spec, parent, args.lr), hooks=hooks, **common)
    elif spec.kind == "scratch" and spec.opt("inherit", "none") != "none":
        # ablation: HKT's weight inheritance without its loss (compact child, cross-entropy only)
        child = compact.build()
        inherit_variant(parent, child, sl.x, sl.y, spec.opt("inherit"))
        fit(child, sl.x, sl.y, hooks=hooks, **common)
    elif spec.kind == "scratch":
        child = spawn_child(parent, compact, sl.x, sl.y, method="scratch", hooks=hooks, **common)
    elif spec.kind == "scratch_full":
        child = spawn_child(parent, task.arch, sl.x, sl.y, method="scratch", hooks=hooks, **common)
    elif spec.kind == "copy" and spec.opt("inherit", "all") != "all":
        # a full-size child that takes from the parent only what the inheritance mode says
        child = fresh_like(parent)
        inherit_variant(parent, child, sl.x, sl.y, spec.opt("inherit"))
        fit(child, sl.x, sl.y, hooks=hooks, **common)
    elif spec.kind == "copy":
        child = spawn_child(parent, None, sl.x, sl.y, method="copy", hooks=hooks, **common)
    elif spec.kind == "ct":
        child = spawn_child(parent, None, sl.x, sl.y, method="copy", child_tuning=spec.opt("mode", "fisher"),
                            child_tuning_p=float(spec.opt("p", "0.3")), hooks=hooks, **common)
    elif spec.kind == "kd":
        # Hinton KD from the parent (T 4, 0.5 CE + 0.5 T^2 KL), the same batches as the others
        child = compact.build()
        loss = KnowledgeDistillation([parent], temperature=float(spec.opt("t", "4")),
                                     alpha=float(spec.opt("alpha", "0.5")), beta=float(spec.opt("beta", "0.5")))
        fit(child, sl.x, sl.y, loss=loss, hooks=hooks, **common)
    else:  # pragma: no cover - parse_methods rejects it
        raise ValueError(spec.kind)
    return accs, child, time.perf_counter() - start


@torch.no_grad()
def latency(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """CPU inference: batch-1 median over 100 calls (ms), and batch-256 time (ms)."""
    model.eval()
    one = x[:1]
    big = x.repeat(-(-256 // len(x)), *([1] * (x.dim() - 1)))[:256]
    for _ in range(10):
        model(one)
    times = []
    for _ in range(100):
        t = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(5):
        model(big)
    return {"batch1_ms": round(statistics.median(times) * 1e3, 4),
            f"batch{len(big)}_ms": round((time.perf_counter() - t) / 5 * 1e3, 3)}


def slice_kl(parent: nn.Module, reference_x: torch.Tensor, x: torch.Tensor, batch: int = 100) -> float:
    """KL(batch || parent reference) as the engine measures it, mean over the slice's batches."""
    detector = FeatureKL.fit(embed(parent, reference_x[:512]))
    feats = embed(parent, x)
    values = [detector.score(feats[i:i + batch]) for i in range(0, len(feats) - batch + 1, batch)]
    return float(sum(values) / max(len(values), 1))


# ---------------------------------------------------------------------------- summary

def mean_std(values: list[float]) -> dict[str, float]:
    m = sum(values) / len(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(m, 4), "std": round(s, 4)}


def beats(rows: dict, a: str, b: str, epoch: str) -> bool | None:
    if a not in rows or b not in rows:
        return None
    return rows[a]["acc"][epoch]["mean"] > rows[b]["acc"][epoch]["mean"]


def size_of(label: str) -> str:
    return "compact" if label.split(":", 1)[0] in COMPACT else "same_size"


def policy_table(slices: list[dict], labels: list[str], kl_threshold: float, epochs: list[str]) -> dict:
    """The spawn decision by evidence. Slices are grouped by what the engine can measure at spawn
    time: drift KL (``< kl_threshold`` / ``>=``) and whether the parent knows the slice's classes
    (``known`` >= 0.5, :func:`daemon.learn.inherit.spawn.known_classes`). Per group and child size: every method's
    mean accuracy, the best one, and inherit-vs-fresh win counts (hkt vs scratch; copy vs
    scratch_full)."""
    groups: dict[str, list[dict]] = {}
    for s in slices:
        key = f"{'low' if s['kl'] < kl_threshold else 'high'}_kl/{'known' if s['known'] >= 0.5 else 'new'}_classes"
        groups.setdefault(key, []).append(s)
    table: dict = {}
    for group in sorted(groups):
        members = groups[group]
        entry: dict = {"slices": [f"{s['task']}:{s['slice']}" for s in members],
                       "kl_range": [round(min(s["kl"] for s in members), 3), round(max(s["kl"] for s in members), 3)]}
        for ep in epochs:
            mean_acc = {m: round(sum(s["methods"][m]["acc"][ep]["mean"] for s in members) / len(members), 4)
                        for m in labels}
            row: dict = {}
            for size in ("compact", "same_size"):
                cands = {m: a for m, a in mean_acc.items() if size_of(m) == size}
                if not cands:
                    continue
                best = max(cands, key=cands.get)
                row[size] = {"mean_acc": cands, "best": best}
            for size, inherit, fresh in (("compact", "hkt", "scratch"), ("same_size", "copy", "scratch_full")):
                if inherit in mean_acc and fresh in mean_acc:
                    wins = sum(bool(beats(s["methods"], inherit, fresh, ep)) for s in members)
                    row[size][f"{inherit}>{fresh}"] = f"{wins}/{len(members)}"
            entry[f"epoch{ep}"] = row
        table[group] = entry
    return table


def plot(summary: dict, path: Path, labels: list[str], epochs: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        slices = summary["tasks"][task]["slices"]
        for m in labels:
            means = [sum(s["methods"][m]["acc"][str(e)]["mean"] for s in slices) / len(slices) for e in epochs]
            stds = [sum(s["methods"][m]["acc"][str(e)]["std"] for s in slices) / len(slices) for e in epochs]
            ax.errorbar(epochs, means, yerr=stds, marker="o", capsize=2, label=m)
        ax.set_title(f"{task} (mean of {len(slices)} slices)", fontsize=9)
        ax.set_xlabel("epochs (same steps for every method)")
        ax.set_ylabel("held-out accuracy")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("filial bench hkt: compact children (hkt/scratch/kd) vs full-size (ct/copy/scratch_full)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main

def run_task(task: Task, specs: list[MethodSpec], args, eval_epochs: list[int]) -> dict:
    t0 = time.perf_counter()
    per_slice: dict[str, dict] = {sl.name: {"acc": {m.label: {e: [] for e in eval_epochs} for m in specs},
                                            "seconds": {m.label: [] for m in specs},
                                            "kl": [], "parent_acc": [], "known": []} for sl in task.slices[1:]}
    info: dict = {}
    children_for_latency: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        parent = task.arch.build()
        first = task.slices[0]
        fit(parent, first.x, first.y, epochs=args.parent_epochs, lr=args.lr, batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(1000 + seed))
        parent_acc0 = accuracy(parent, first.x_test, first.y_test)
        log(f"{task.name} seed {seed}: parent {task.arch.params} acc on {first.name} {parent_acc0:.3f}")
        for sl in task.slices[1:]:
            rec = per_slice[sl.name]
            rec["kl"].append(slice_kl(parent, first.x, sl.x))
            rec["parent_acc"].append(accuracy(parent, sl.x_test, sl.y_test))
            rec["known"].append(known_classes(parent, sl.x, sl.y))
            line = []
            for spec in specs:
                accs, child, secs = run_method(spec, parent, task, sl, args, seed, eval_epochs)
                for e in eval_epochs:
                    rec["acc"][spec.label][e].append(accs[e])
                rec["seconds"][spec.label].append(secs)
                if spec.label not in info:
                    info[spec.label] = {"params": parameter_count(child),
                                        "size": "compact" if parameter_count(child) < parameter_count(parent)
                                        else "full"}
                    children_for_latency.setdefault(info[spec.label]["size"], (child, sl.x_test))
                line.append(f"{spec.label} {accs[max(eval_epochs)]:.3f}")
            log(f"  {sl.name:8s} KL {rec['kl'][-1]:6.2f} parent {rec['parent_acc'][-1]:.3f} | " + "  ".join(line))
    # latency per architecture (every compact method shares one, every full-size one the other):
    # best of 3 medians, so another process's burst on a shared machine does not land on one method
    lat = {size: min((latency(m, x) for _ in range(3)), key=lambda r: r["batch1_ms"])
           for size, (m, x) in children_for_latency.items()}
    for label in info:
        info[label]["latency"] = lat[info[label]["size"]]
    slices_out = []
    for name, rec in per_slice.items():
        methods = {label: {"acc": {str(e): mean_std(v) for e, v in rec["acc"][label].items()},
                           "train_s": round(sum(rec["seconds"][label]) / len(rec["seconds"][label]), 3)}
                   for label in rec["acc"]}
        slices_out.append({"slice": name, "kl": round(sum(rec["kl"]) / len(rec["kl"]), 4),
                           "parent_acc": round(sum(rec["parent_acc"]) / len(rec["parent_acc"]), 4),
                           "known": round(sum(rec["known"]) / len(rec["known"]), 4), "task": task.name,
                           "methods": methods})
    return {"arch": task.arch.model_dump(), "child_arch": compact_architecture(task.arch, args.ratio).model_dump(),
            "models": info, "slices": slices_out, "wall_s": round(time.perf_counter() - t0, 1)}


def headline(slices: list[dict], labels: list[str], epochs: list[str]) -> dict:
    """Over all slices: how often hkt beats each other method (by the seed-mean), per eval epoch."""
    out: dict = {}
    for ep in epochs:
        row = {}
        for other in labels:
            if other == "hkt" or "hkt" not in labels:
                continue
            wins = sum(bool(beats(s["methods"], "hkt", other, ep)) for s in slices)
            row[f"hkt>{other}"] = f"{wins}/{len(slices)}"
        row["mean_acc"] = {m: round(sum(s["methods"][m]["acc"][ep]["mean"] for s in slices) / len(slices), 4)
                           for m in labels}
        out[f"epoch{ep}"] = row
    return out


def main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    specs = parse_methods(args.methods)
    labels = [s.label for s in specs]
    eval_epochs = sorted({int(e) for e in args.eval_epochs.split(",")})
    ep_keys = [str(e) for e in eval_epochs]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    summary: dict = {"bench": "hkt", "config": {
        "tasks": tasks, "streams": streams, "slices": args.slices, "methods": labels, "ratio": args.ratio,
        "parent_epochs": args.parent_epochs, "eval_epochs": eval_epochs, "seeds": args.seeds,
        "max_train": args.max_train, "batch_size": args.batch_size, "lr": args.lr,
        "threads": torch.get_num_threads(), "kl_threshold": args.kl_threshold,
        "kl_estimator": "daemon.learn.drift: parent features, 8 PCA comps, ref 512 rows of slice 0, batches of 100",
        "figures_on": "each slice's held-out test split"}, "tasks": {}}
    for task_name in tasks:
        for stream in streams:
            task = build_task(task_name, stream, args)
            log(f"task {task.name}: {len(task.slices)} slices, {len(task.slices[0].x)} train rows/slice")
            summary["tasks"][task.name] = run_task(task, specs, args, eval_epochs)
    all_slices = [s for t in summary["tasks"].values() for s in t["slices"]]
    summary["headline"] = headline(all_slices, labels, ep_keys)
    summary["policy"] = policy_table(all_slices, labels, args.kl_threshold, ep_keys)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        plot(summary, out_dir / f"{args.name}.png", labels, eval_epochs)
        summary["chart"] = str(out_dir / f"{args.name}.png")
    (out_dir / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['wall_s']} s: {json.dumps(summary['headline'])}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="filial bench hkt", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
