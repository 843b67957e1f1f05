"""A model's fingerprint: what it was trained on, as statistics of its own penultimate features,
so that similarity to new inputs can be measured without the training rows (zoo members carry one;
the serving layer weighs members by it, seed 003's "similarity metric").

It is :class:`daemon.learn.drift.FeatureKL` (the drift detector's reference: centre, top principal
axes, variance along them) plus the variance left outside those axes, so a row far from the
reference *off* its main axes is still far. Two measures:

- :meth:`Fingerprint.kl` — batch level: KL(batch || reference) on the principal axes, the drift score.
- :meth:`Fingerprint.row_distance` — row level: the squared Mahalanobis distance on the principal
  axes plus the residual's squared norm over the residual variance, divided by the degrees of
  freedom. A row drawn from the reference scores about 1 in any member's feature space (the
  expectation of a chi-square over its degrees of freedom), so distances of members with different
  feature spaces compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from daemon.learn.drift import FeatureKL
from daemon.learn.training import embed, model_input

COMPONENTS = 8


@dataclass(frozen=True)
class Fingerprint:
    detector: FeatureKL
    residual_var: float   # mean variance per dimension outside the principal axes
    dims: int             # feature dimensions

    @classmethod
    def fit(cls, features: torch.Tensor, components: int = COMPONENTS) -> "Fingerprint":
        f = features.double().flatten(1)
        detector = FeatureKL.fit(f, components)
        centered = f - detector.center
        residual = centered - (centered @ detector.basis) @ detector.basis.T
        free = max(f.shape[1] - detector.basis.shape[1], 1)
        residual_var = float(residual.pow(2).sum(1).mean()) / free if len(f) else 0.0
        return cls(detector, residual_var, f.shape[1])

    def kl(self, features: torch.Tensor) -> float:
        return self.detector.score(features)

    def row_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Per-row distance (n,) to the reference, about 1 for a row like the reference's."""
        f = features.double().flatten(1)
        centered = f - self.detector.center
        z = centered @ self.detector.basis
        floor = 1e-2 * float(self.detector.var.mean().clamp_min(1e-12))
        principal = (z.pow(2) / self.detector.var.clamp_min(floor)).sum(1)
        k = self.detector.basis.shape[1]
        free = self.dims - k
        if free <= 0:
            return (principal / k).float()
        residual = (centered - z @ self.detector.basis.T).pow(2).sum(1) / max(self.residual_var, floor)
        return ((principal + residual) / (k + free)).float()

    def to_tensors(self, prefix: str = "fingerprint") -> dict[str, torch.Tensor]:
        return {**self.detector.to_tensors(prefix), f"{prefix}.dims": torch.tensor([self.dims]),
                f"{prefix}.residual_var": torch.tensor([self.residual_var], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "fingerprint") -> "Fingerprint":
        return cls(FeatureKL.from_tensors(tensors, prefix), float(tensors[f"{prefix}.residual_var"][0]),
                   int(tensors[f"{prefix}.dims"][0]))


def encode_fingerprints(fingerprints: Mapping[str, Fingerprint]) -> dict[str, torch.Tensor]:
    """Per-slice fingerprints as one flat tensor dict (the zoo's ``fingerprint`` safetensors:
    ``{slice}.center``, ``{slice}.basis``, ...); the manifest lists the slices in order."""
    out: dict[str, torch.Tensor] = {}
    for name, fp in fingerprints.items():
        out.update(fp.to_tensors(name))
    return out


def decode_fingerprints(tensors: Mapping[str, torch.Tensor], slices: list[str]) -> dict[str, Fingerprint]:
    """The inverse of :func:`encode_fingerprints`; ``slices`` comes from the manifest, so a slice
    name holding dots is never guessed from the keys. KeyError names a missing tensor."""
    return {name: Fingerprint.from_tensors(tensors, name) for name in slices}


MIN_ROWS = 16  # fewer rows than this give no usable covariance: such a slice gets no fingerprint


def fit_slices(model: torch.nn.Module, data_type: str, rows: Mapping[str, torch.Tensor]) -> dict[str, Fingerprint]:
    """``model``'s fingerprint of each slice, from that slice's rows (wire form), in its own features."""
    return {name: Fingerprint.fit(embed(model, model_input(x, data_type))) for name, x in rows.items()
            if len(x) >= MIN_ROWS}
