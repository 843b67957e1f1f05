"""Supersession: a newer slice that relabels an older slice's inputs replaces it.

When labels change on inputs the learner has already seen (a labelling policy changed, two classes
were renamed, a producer's concept moved), the older slice's held-out rows would hold every merge
to the old labels (no model scores well on both, so the gate's per-slice guard rejects each
candidate that learns the new ones) and its replay rows would keep teaching them. The newest labels
are what a user streams them for: the contradicted slice is *superseded* (its buffers and
bookkeeping are dropped, as an evicted slice's are) and the served model is free to follow.

A batch of slice ``B`` contradicts slice ``A`` (``A`` may be ``B`` itself: labels that changed
within one slice) when, in the published version (what followers hold; it changes only when a
version is adopted):

1. **it relabels**: on the batch's rows whose labels ``A`` has, the version's accuracy is
   significantly below its accuracy on ``A``'s held-out rows of those labels (the concept-drift
   test, :func:`daemon.learn.drift.concept_drift`), and mapping each predicted class to the batch's
   majority label for it explains most of that drop (:data:`MIN_EXPLAINED`): the model still tells
   the inputs apart as it did, only their names changed. Only ``A``'s own classes are renamed: rows
   predicted as a class ``A`` never had are a mistake (on a class-incremental stream, a new class
   taken for an old one: before this rule a slice of four new classes superseded itself on a
   version that had seen four of its batches). A new domain fails this, since the
   model's predictions there are noise rather than a renaming (measured with MNIST-5k and the
   tabular blobs: 0.88-1.10 of the drop explained for label swaps, at most 0.53 for rotations of
   30-120 degrees, 0.41 for permuted pixels, 0 for covariate shift);
2. **on the same inputs**: KL(batch || ``A``'s held-out rows) in the version's features is below
   the drift threshold. Relabelling explains the batch against every slice that has its labels;
   the inputs say which slice it relabels (label swaps measured 0.10-0.39, blobs moved away
   2-12; no rotation passed 1.);
3. **persistently**: the same ``A`` on two consecutive batches of ``B`` (:data:`CONFIRMING_BATCHES`),
   so one mislabelled batch supersedes nothing.

The detector is pure: :func:`profile` summarises a slice's held-out rows, :func:`contradicted`
judges a batch against those summaries; the engine keeps the count, the profiles per published
version and small batches until they add up (:mod:`daemon.engine.superseding`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from daemon.learn.drift import MIN_CONCEPT_DROP, concept_drift
from daemon.learn.fingerprint import MIN_ROWS, Fingerprint

MIN_EXPLAINED = 0.75      # share of the accuracy drop a renaming of the predicted classes must explain
CONFIRMING_BATCHES = 2    # consecutive batches of a slice that must contradict the same older slice


@dataclass(frozen=True)
class SliceProfile:
    """The published version on one slice's held-out rows: per class, rows and correct predictions,
    and the fingerprint of the rows in its features."""
    rows: torch.Tensor      # (num_classes,) held-out rows per label
    correct: torch.Tensor   # (num_classes,) of those, predicted right
    fingerprint: Fingerprint | None  # None: too few rows to fit one

    @property
    def classes(self) -> torch.Tensor:
        return self.rows > 0

    def accuracy(self, classes: torch.Tensor) -> float | None:
        """Accuracy on the held-out rows of ``classes`` (a boolean mask), None when it has none."""
        n = float(self.rows[classes].sum())
        return float(self.correct[classes].sum()) / n if n else None


def profile(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> SliceProfile:
    """A slice's profile from the published version's features and logits of its held-out rows."""
    right = (logits.argmax(1) == labels).float()
    rows = torch.bincount(labels, minlength=num_classes)[:num_classes].float()
    correct = torch.bincount(labels, weights=right, minlength=num_classes)[:num_classes]
    fingerprint = Fingerprint.fit(features) if len(labels) >= MIN_ROWS else None
    return SliceProfile(rows, correct, fingerprint)


@dataclass(frozen=True)
class Relabelling:
    """The version's predictions on a batch's rows against the batch's labels."""
    rows: int
    accuracy: float    # predicted label == batch label
    remapped: float    # each predicted class renamed to the batch's majority label for it

    def explained(self, expected: float) -> float:
        """The share of the drop from ``expected`` that the renaming explains (1: all of it)."""
        drop = expected - self.accuracy
        return (self.remapped - self.accuracy) / drop if drop > 0 else 0.0


def relabelling(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int,
                renamable: torch.Tensor | None = None) -> Relabelling:
    """``renamable`` (a boolean mask of classes; default all): only these predicted classes may be
    renamed. Judged against a slice, they are the slice's own labels: a version that predicts a class
    the slice never had for its rows (a new class taken for an old one, as on a class-incremental
    stream) is wrong about those inputs, not calling them by another name."""
    n = len(labels)
    if n == 0:
        return Relabelling(0, float("nan"), float("nan"))
    pairs = torch.zeros(num_classes, num_classes)
    pairs.index_put_((predicted, labels), torch.ones(n), accumulate=True)
    renamed = pairs.max(1).values
    if renamable is not None:
        renamed = torch.where(renamable, renamed, pairs.diagonal())
    return Relabelling(n, float(pairs.diagonal().sum()) / n, float(renamed.sum()) / n)


def may_relabel(r: Relabelling) -> bool:
    """A cheap first look, before any older slice is profiled: a renaming explains at least half of
    what the version gets wrong on the batch (it explains :data:`MIN_EXPLAINED` of the drop from
    the slice's accuracy, which is at most 1, in a contradiction)."""
    wrong = 1.0 - r.accuracy
    return r.rows > 0 and wrong >= MIN_CONCEPT_DROP and r.remapped - r.accuracy >= 0.5 * wrong


@dataclass(frozen=True)
class Contradiction:
    slice: str         # the older slice the batch relabels
    accuracy: float    # the version's accuracy on the batch rows of that slice's labels
    expected: float    # its accuracy on that slice's held-out rows of those labels
    explained: float
    kl: float

    def describe(self) -> str:
        return (f"relabels {self.slice!r} (accuracy {self.accuracy:.3f} vs {self.expected:.3f} on its held-out rows, "
                f"{self.explained:.0%} of the drop explained by renaming classes; KL {self.kl:.3f} to its inputs)")


def contradicted(predicted: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                 profiles: Mapping[str, SliceProfile], num_classes: int, kl_threshold: float,
                 alpha: float, min_rows: int) -> Contradiction | None:
    """The older slice this batch relabels on the same inputs (the nearest by KL when several do),
    or None. ``predicted``/``features``: the published version's on the batch's rows."""
    if not may_relabel(relabelling(predicted, labels, num_classes)):
        return None
    found: list[Contradiction] = []
    for name, p in sorted(profiles.items()):
        if p.fingerprint is None:
            continue
        mask = p.classes[labels]
        if int(mask.sum()) < min_rows:
            continue
        batch_classes = torch.zeros(num_classes, dtype=torch.bool)
        batch_classes[labels[mask]] = True
        expected = p.accuracy(batch_classes)
        r = relabelling(predicted[mask], labels[mask], num_classes, renamable=p.classes)
        if expected is None or not concept_drift(r.accuracy, r.rows, expected, alpha):
            continue
        explained = r.explained(expected)
        if explained < MIN_EXPLAINED:
            continue
        kl = p.fingerprint.kl(features[mask])
        if kl < kl_threshold:
            found.append(Contradiction(name, r.accuracy, expected, explained, kl))
    return min(found, key=lambda c: c.kl) if found else None
