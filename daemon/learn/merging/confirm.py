"""Confirmation on fresh rows: a merge candidate that the gate found better than the published
version, but not yet significantly so, is held and judged again on each later batch, on its rows,
before anything trains on them.

Why: a slice a few batches old has few held-out rows (4 batches of 50 rows at
``heldout_fraction`` 0.2 leave 20 to judge on), so a candidate that has learned it well shows a gain
of a few rows there, not significant among the older slices' churn, and waits a merge cycle or more.
The next batches of that slice are rows neither model has trained on: the same paired evidence, drawn
fresh, 50 rows at a time instead of 10.

The rule: the candidate's judge rows (per slice, per-row correctness of both models, as
:func:`daemon.learn.merging.gate.paired_gate` took them) grow by each fresh batch's rows under the
batch's slice, and the paired gate runs again on all of it, with the same weights, tolerance and
per-slice guard, at a level that halves with each look: ``alpha * 2**-k`` at look ``k`` = 1, 2, ...
(alpha spending), so however many batches a candidate waits, the chance that a candidate no better
than the published version is confirmed is at most ``alpha`` by the union bound, on top of the merge's
own gate. Only a verdict rejected for lack of significance is held (:func:`worth_confirming`): a
candidate worse or no better overall, or regressing a slice, never is, and every look applies the
guard again, so fresh rows of one slice cannot outvote a regression on another.

A slice that the judge rows lack (the fresh batch opened it) weighs 1, the recency weight of the
slice seen last. The weights are the merge's (recency at its snapshot), fixed for the candidate's life.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from daemon.learn.merging.gate import GateVerdict, paired_gate


def worth_confirming(verdict: GateVerdict) -> bool:
    """Rejected only because its gain is not yet significant: no slice regressed and the candidate is
    better on the held-out rows (``gain`` > 0, so neither worse by the paired test nor equal on every row)."""
    return not verdict.accepted and not verdict.regressions and verdict.gain is not None and verdict.gain > 0


@dataclass
class Confirmation:
    """One held candidate's evidence: ``served`` / ``candidate`` are per-slice correctness on the same
    rows (the merge's judge rows, then fresh rows appended); :meth:`update` adds a batch and judges."""
    served: dict[str, torch.Tensor]
    candidate: dict[str, torch.Tensor]
    weights: dict[str, float] | None
    alpha: float
    tolerance: float
    guard_alpha: float
    looks: int = 0
    fresh_rows: int = 0
    confirmed: GateVerdict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        self.served, self.candidate = dict(self.served), dict(self.candidate)

    def look_alpha(self, look: int) -> float:
        """The level of look ``look`` (1, 2, ...): the levels sum to at most ``alpha``."""
        return self.alpha * 2.0 ** -look

    def update(self, slice_name: str, served_correct: torch.Tensor, candidate_correct: torch.Tensor) -> GateVerdict:
        """Add a fresh batch (per-row correctness of both models on its rows) and judge all the rows
        again at this look's level; a verdict that accepts is kept in ``confirmed``."""
        a, b = served_correct.reshape(-1).bool().cpu(), candidate_correct.reshape(-1).bool().cpu()
        if len(a) != len(b):
            raise ValueError(f"{len(a)} served rows but {len(b)} candidate rows (the same rows needed)")
        empty = torch.zeros(0, dtype=torch.bool)
        self.served[slice_name] = torch.cat([self.served.get(slice_name, empty), a])
        self.candidate[slice_name] = torch.cat([self.candidate.get(slice_name, empty), b])
        self.looks += 1
        self.fresh_rows += len(a)
        weights = None
        if self.weights is not None:
            weights = {name: self.weights.get(name, 1.0) for name in self.served}
        verdict = paired_gate(self.served, self.candidate, weights=weights, tolerance=self.tolerance,
                              alpha=self.look_alpha(self.looks), guard_alpha=self.guard_alpha)
        if verdict.accepted:
            self.confirmed = verdict
        return verdict


def fresh_correctness(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row correctness from a model's logits on a batch (what :meth:`Confirmation.update` takes)."""
    return (logits.argmax(1) == y.reshape(-1).to(logits.device)).cpu()

