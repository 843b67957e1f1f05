"""The publish gate: a candidate is served only if no slice's held-out accuracy drops by more than
the tolerance, so continual learning never trades one slice away silently; every verdict names
each failing slice with its figures, for the manifest and the logs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class SliceRegression:
    slice: str
    served: float
    candidate: float

    @property
    def drop(self) -> float:
        return self.served - self.candidate


@dataclass(frozen=True)
class GateVerdict:
    accepted: bool
    regressions: tuple[SliceRegression, ...] = field(default_factory=tuple)

    @property
    def reason(self) -> str:
        if self.accepted:
            return "no slice dropped beyond tolerance"
        return "; ".join(f"{r.slice}: {r.served:.3f} -> {r.candidate:.3f} (-{r.drop:.3f})"
                         for r in self.regressions)


def gate(served: Mapping[str, float], candidate: Mapping[str, float], tolerance: float) -> GateVerdict:
    """Reject when any slice's held-out accuracy falls more than ``tolerance`` below the served one.

    Slices the served model has no figure for (new slices) cannot regress. A slice the
    candidate could not be measured on counts as a regression: we never publish blind.
    """
    regressions = []
    for name, before in served.items():
        if before is None or math.isnan(before):
            continue
        after = candidate.get(name, float("nan"))
        if math.isnan(after) or after < before - tolerance:
            regressions.append(SliceRegression(name, before, after))
    return GateVerdict(not regressions, tuple(sorted(regressions, key=lambda r: r.slice)))
