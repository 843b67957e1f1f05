"""When the first served model is published: a pure rule over what the bootstrap has seen and the
model's held-out accuracy per slice (the learner trains; this says when, and why, for the log).

- wait for ``min_batches`` batches or ``min_rows`` rows, whichever comes first (rows count as well
  as batches, so that a stream of large batches is served after a few of them);
- then publish once the held-out accuracy reaches ``accuracy`` on every slice (a weak first model
  would call its own slice drift);
- at twice either minimum, publish anyway (a first model that is weak beats none; ``capped`` says so);
- ``idle`` (the stream paused: no rows are coming for now): the minimums are waived, the accuracy
  is not, and there is no cap.

The held-out accuracy is passed as a function so that it is computed only when the rule needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class BootstrapVerdict:
    done: bool
    reason: str
    capped: bool = False   # published below ``accuracy`` because the cap was reached


@dataclass(frozen=True)
class BootstrapRule:
    min_batches: int
    min_rows: int
    accuracy: float

    def verdict(self, batches: int, rows: int, heldout_accuracy: Callable[[], Mapping[str, float]],
                idle: bool = False) -> BootstrapVerdict:
        seen = f"{batches} batches, {rows} rows"
        if not idle and batches < self.min_batches and rows < self.min_rows:
            return BootstrapVerdict(False, f"training the first served model ({batches}/{self.min_batches} "
                                           f"batches, {rows}/{self.min_rows} rows)")
        accs = heldout_accuracy()
        worst = min(accs, key=accs.__getitem__) if accs else None
        if worst is not None and accs[worst] >= self.accuracy:
            return BootstrapVerdict(True, f"held-out accuracy {accs[worst]:.3f} >= {self.accuracy} after {seen}")
        figure = f"{accs[worst]:.3f} on {worst}" if worst is not None else "not measured yet"
        if not idle and (batches >= 2 * self.min_batches or rows >= 2 * self.min_rows):
            return BootstrapVerdict(True, f"served after {seen} (the cap) below bootstrap_accuracy: held-out "
                                          f"accuracy {figure}", capped=True)
        cap = f"served at {2 * self.min_batches} batches or {2 * self.min_rows} rows at the latest"
        return BootstrapVerdict(False, f"waiting: held-out accuracy {figure} < {self.accuracy} ({seen}; {cap})")
