"""Continual-learning metrics of a served version, as Avalanche defines them for a stream of experiences.

Avalanche scores a model after each experience on every experience's test set: *average accuracy*
is the mean over the experiences seen; *forgetting* of an experience is its accuracy right after the
last training on it minus its accuracy now; *backward transfer* (BWT, Lopez-Paz & Ranzato 2017) is
the negative of forgetting. A daemon has no experience boundaries, so a slice plays the experience
and a published version plays "after training": a slice is *learned* by the first version published
after batches of it arrived, and that version's held-out accuracy on it is the reference its later
forgetting is measured from. Slices learned by this very version have no forgetting yet; as in
Avalanche, the averages are over the others.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ContinualMetrics:
    accuracy: dict[str, float]          # held-out accuracy per slice seen
    average_accuracy: float | None
    learned: list[str]                  # slices this version is the first to have learned since their last batch
    forgetting: dict[str, float]        # per earlier-learned slice: accuracy when learned minus now
    average_forgetting: float | None
    bwt: float | None                   # backward transfer: -average_forgetting

    def record(self) -> dict[str, Any]:
        return {"average_accuracy": self.average_accuracy, "average_forgetting": self.average_forgetting,
                "bwt": self.bwt, "forgetting": self.forgetting, "learned": self.learned}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def continual_metrics(accuracy: Mapping[str, float], learned_accuracy: Mapping[str, float],
                      fresh: Collection[str]) -> ContinualMetrics:
    """``accuracy``: this version's held-out accuracy per slice; ``learned_accuracy``: each slice's
    accuracy when it was last learned (by an earlier version); ``fresh``: slices with batches since."""
    seen = {s: a for s, a in accuracy.items() if a == a}  # NaN: a slice with no held-out rows yet
    forgetting = {s: round(learned_accuracy[s] - a, 4) for s, a in sorted(seen.items())
                  if s not in fresh and s in learned_accuracy}
    average_forgetting = _mean(list(forgetting.values()))
    return ContinualMetrics(
        accuracy=dict(sorted(seen.items())), average_accuracy=_mean(list(seen.values())),
        learned=sorted(s for s in fresh if s in seen), forgetting=forgetting,
        average_forgetting=average_forgetting,
        bwt=None if average_forgetting is None else round(-average_forgetting, 4))
