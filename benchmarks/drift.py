"""Drift estimator: KL of shifted batches against a served model's reference, feature vs raw pixels.

A CNN is trained on upright MNIST-5k (the "served model"); its reference fingerprint is built from
``--reference-sizes`` upright rows (80 is one batch's train rows: a freshly spawned child's
reference; 512 is the default ``reference_size``). Batches of ``--batch-size`` rows from held-out
data under each shift (none, rotation 30/90°, gaussian noise, pixel permutation) are scored with

- ``feature``: the project's detector (:class:`daemon.learn.drift.FeatureKL`: diagonal-Gaussian
  KL(batch || reference) on the top-8 principal axes of the model's penultimate features);
- ``pixel_histogram``: mean over pixels of a 16-bin histogram KL(batch || reference) with add-one
  smoothing, the usual raw-data baseline (what Evidently/Frouros-style detectors do per column).

It also reports the threshold :func:`daemon.learn.drift.calibrate_threshold` picks at a 1% false-alarm
rate, and the detection rate of each shift at kl_threshold 0.5. Figures: mean ± std over
``--trials`` batches.
"""

from __future__ import annotations

import argparse
import time

import torch

from tools.datasets import load_dataset
from tools.scenarios import parse_phase
from benchmarks import progress
from daemon.engine.settings import LearnerSettings
from daemon.learn.drift import FeatureKL, calibrate_threshold
from daemon.learn.models import infer_architecture
from daemon.learn.training import CrossEntropy, embed, fit, model_input

SHIFTS = ("same=identity", "rot30=rotate:30", "rot90=rotate:90", "noise100=noise:100", "permuted=permute:7")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist5k", help="bundled dataset (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="rows per scored batch (default: %(default)s)")
    parser.add_argument("--reference-sizes", type=int, nargs="+", default=[80, 512],
                        help="reference sample sizes to compare (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=20, help="batches scored per shift (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the served model")
    parser.add_argument("--label-smoothing", type=float, default=LearnerSettings().label_smoothing,
                        help="the served model's cross-entropy label smoothing (default: the learner's, "
                        "%(default)s, so the features are the daemon's; 0: plain cross-entropy)")
    parser.add_argument("--threshold", type=float, default=0.5, help="kl_threshold for the detection rates")
    parser.add_argument("--seed", type=int, default=0)


_log = progress("drift")


def pixel_histogram_kl(batch: torch.Tensor, reference: torch.Tensor, bins: int = 16) -> float:
    """Mean per-pixel KL(batch || reference) of value histograms over shared 0-255 bins."""
    def hist(x: torch.Tensor) -> torch.Tensor:
        idx = (x.flatten(1).float().clamp(0, 255) * bins / 256).long().clamp(max=bins - 1)
        counts = torch.zeros(idx.shape[1], bins).scatter_add_(1, idx.T, torch.ones_like(idx.T, dtype=torch.float))
        return (counts + 1) / (counts + 1).sum(1, keepdim=True)
    p, q = hist(batch), hist(reference)
    return float((p * (p / q).log()).sum(1).mean())


def _stats(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values)
    return {"mean": round(float(t.mean()), 3), "std": round(float(t.std()), 3) if len(t) > 1 else 0.0}


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ds = load_dataset(args.dataset)
    order = torch.randperm(len(ds.x), generator=gen)
    half = len(order) // 2
    train_idx, held_idx = order[:half], order[half:]
    arch = infer_architecture(ds.data_type, ds.x[:1], ds.num_classes, None)
    model = arch.build()
    _log(f"training the served model on {half} upright rows for {args.epochs} epochs")
    fit(model, model_input(ds.x[train_idx], ds.data_type), ds.y[train_idx], epochs=args.epochs, lr=1e-3,
        batch_size=64, loss=CrossEntropy(args.label_smoothing), generator=gen)
    model.eval()

    results: dict[str, dict] = {}
    calibrated: dict[str, float] = {}
    for ref_size in args.reference_sizes:
        ref_x = ds.x[train_idx[torch.randperm(half, generator=gen)[:ref_size]]]
        ref_features = embed(model, model_input(ref_x, ds.data_type))
        detector = FeatureKL.fit(ref_features)
        calibrated[str(ref_size)] = round(calibrate_threshold(ref_features, args.batch_size, 0.01), 3)
        for spec in SHIFTS:
            phase = parse_phase(spec)
            feature, pixel = [], []
            for _ in range(args.trials):
                pick = held_idx[torch.randperm(len(held_idx), generator=gen)[:args.batch_size]]
                x, _ = phase.apply(ds.x[pick], ds.y[pick])
                feature.append(detector.score(embed(model, model_input(x, ds.data_type))))
                pixel.append(pixel_histogram_kl(x, ref_x))
            entry = results.setdefault(phase.name, {})
            entry[f"ref{ref_size}"] = {
                "feature": _stats(feature), "pixel_histogram": _stats(pixel),
                "feature_detection_rate": round(sum(v >= args.threshold for v in feature) / len(feature), 3)}
            _log(f"ref={ref_size} {phase.name:9s} feature KL {entry[f'ref{ref_size}']['feature']} "
                 f"pixel KL {entry[f'ref{ref_size}']['pixel_histogram']}")
    return {"bench": "drift", "dataset": args.dataset, "batch_size": args.batch_size, "trials": args.trials,
            "estimator": "diag-Gaussian KL(batch||ref) on top-8 PCA axes of penultimate features",
            "threshold": args.threshold, "kl": results, "calibrated_threshold_at_1pct_false_alarm": calibrated,
            "seconds": round(time.perf_counter() - started, 1)}
