"""Drift: how far a batch lies from a model's reference distribution, in that model's features.

A detector is small, as River's are: :meth:`DriftDetector.fit` builds one from reference features,
:meth:`DriftDetector.score` says how far a batch's features lie from that reference (0 = alike,
larger = further; compared against ``kl_threshold``), and ``to_tensors`` / ``from_tensors`` carry
it through a checkpoint. Unlike River's streaming detectors, a fitted detector is immutable: the
model tree refits a node's detector when the node's reference grows. :data:`DETECTORS` lists them.

:class:`FeatureKL` (chosen by measurement, see README "Drift"): the model's penultimate features
(``model.features``) are projected on the top ``k`` principal components of the reference
features (k = 8 by default), a diagonal Gaussian is fitted on each side, and

    KL(batch || reference) = sum_j 0.5 * [ v_b/v_r + (m_r - m_b)^2 / v_r - 1 + ln(v_r / v_b) ]

is the exact KL between the two fitted Gaussians. Raw-pixel histograms barely move under
rotation; the features of the model that must classify the data do. The projection matters
because the plug-in estimate is biased upwards by roughly (dimensions / samples). Measured by
``filial bench drift`` (MNIST-5k, default CNN, batches of 100, references of 80 / 512 rows, mean
of 10 batches): the same distribution scores 0.17 / 0.09, rotation by 30° 0.64 / 0.46, by 90°
2.1 / 2.0, noise sigma=100 2.8 / 2.5, permuted pixels 7.8 / 8.6; a 16-bin per-pixel histogram KL
on the same batches moves only from 0.088 to 0.152 under a 90° rotation. So the seed threshold 0.5
separates drift from noise even for a child whose reference is a single batch. Variances get a
floor of ``eps`` times the mean reference variance so dead units do not explode the figure.

Direction: KL(new || ref), "how surprising is the batch to the reference" (Frouros' direction;
Evidently computes KL(ref || cur)). :func:`calibrate_threshold` turns a false-alarm rate into a
threshold from reference-vs-reference splits, for users who do not want a fixed number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Protocol, Self

import torch


class DriftDetector(Protocol):
    """Fit on reference features, score a batch's features, round-trip through tensors."""

    name: ClassVar[str]

    @classmethod
    def fit(cls, reference: torch.Tensor) -> Self: ...

    def score(self, features: torch.Tensor) -> float: ...

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]: ...

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> Self: ...


def gaussian_kl(mean_new: torch.Tensor, var_new: torch.Tensor, mean_ref: torch.Tensor, var_ref: torch.Tensor,
                eps: float = 1e-2) -> float:
    """KL(new || ref) between diagonal Gaussians, summed over dimensions."""
    floor = eps * float(var_ref.mean().clamp_min(1e-12))
    v_new, v_ref = var_new.clamp_min(floor), var_ref.clamp_min(floor)
    kl = 0.5 * (v_new / v_ref + (mean_ref - mean_new) ** 2 / v_ref - 1.0 + torch.log(v_ref / v_new))
    return max(float(kl.sum()), 0.0)  # rounding can leave -1e-30 where the two are the same


@dataclass(frozen=True)
class FeatureKL:
    """Diagonal-Gaussian KL(batch || reference) on the reference's top principal axes."""

    name: ClassVar[str] = "feature_kl"

    center: torch.Tensor   # (D,)
    basis: torch.Tensor    # (D, k) orthonormal columns, largest variance first
    var: torch.Tensor      # (k,) reference variance along each axis (its mean there is 0)
    count: int

    @classmethod
    def fit(cls, reference: torch.Tensor, components: int = 8) -> "FeatureKL":
        f = reference.double().flatten(1)
        center = f.mean(0)
        centered = f - center
        cov = centered.T @ centered / max(len(f), 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        k = min(components, f.shape[1])
        return cls(center, eigvecs[:, -k:].flip(1).contiguous(), eigvals[-k:].flip(0).clamp_min(0), len(f))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double().flatten(1) - self.center) @ self.basis

    def score(self, features: torch.Tensor) -> float:
        """KL(batch || reference) in the reference's principal axes."""
        z = self.project(features)
        return gaussian_kl(z.mean(0), z.var(0, unbiased=False), torch.zeros_like(self.var), self.var)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.center": self.center, f"{prefix}.basis": self.basis, f"{prefix}.var": self.var,
                f"{prefix}.count": torch.tensor([self.count])}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> "FeatureKL":
        return cls(tensors[f"{prefix}.center"], tensors[f"{prefix}.basis"], tensors[f"{prefix}.var"],
                   int(tensors[f"{prefix}.count"][0]))


DETECTORS: dict[str, type[DriftDetector]] = {FeatureKL.name: FeatureKL}


def calibrate_threshold(reference_features: torch.Tensor, batch_size: int, false_alarm_rate: float = 0.01,
                        trials: int = 200, seed: int = 0, detector: type[DriftDetector] = FeatureKL) -> float:
    """Threshold that a batch drawn from the reference itself exceeds with ``false_alarm_rate``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(reference_features)
    size = min(batch_size, n // 2)
    values = []
    for _ in range(trials):
        order = torch.randperm(n, generator=gen)
        values.append(detector.fit(reference_features[order[size:]]).score(reference_features[order[:size]]))
    return float(torch.tensor(values).quantile(1.0 - false_alarm_rate))


MIN_CONCEPT_DROP = 0.05  # below this a significant drop is not worth an alarm (a model near 1.0 has tiny noise)


def concept_drift(accuracy: float, rows: int, expected: float | None, alpha: float) -> bool:
    """Concept drift (P(y|x) changed) that feature KL cannot see: the served model's accuracy on
    the batch lies significantly below what it has scored so far (its prequential accuracy).

    As DDM (Gama et al. 2004) monitors the error rate, but as one exact test per batch: drift when
    ``P(X <= correct)`` for ``X ~ Binomial(rows, expected)`` is at most ``alpha`` and the drop is at
    least :data:`MIN_CONCEPT_DROP`. Exact, because near 1.0 the normal approximation's tail is far
    too light (at z = 4 a model at 0.98 would raise a false alarm every 300 batches of 50). With
    ``alpha = 1e-5`` a stationary stream raises one about every 100,000 batches; two labels of five
    swapped (0.98 -> 0.60 on 50 rows) has a tail probability near 1e-20. ``expected`` None
    (nothing measured yet): no verdict.
    """
    if expected is None or rows <= 0 or expected - accuracy < MIN_CONCEPT_DROP:
        return False
    correct = round(accuracy * rows)
    p = min(max(expected, 1e-9), 1 - 1e-9)
    k = torch.arange(correct + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(rows + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1)
               - torch.lgamma(rows - k + 1) + k * math.log(p) + (rows - k) * math.log1p(-p))
    return float(torch.logsumexp(log_pmf, 0)) <= math.log(alpha)
