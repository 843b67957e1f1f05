"""The per-batch decision: keep the served model, retrain the nearest child, or spawn one.

A batch is *drift* when KL(batch || served reference) >= ``kl_threshold`` (covariate shift), or when
the served model's accuracy on it is improbably low given its prequential accuracy so far
(:func:`daemon.learn.drift.concept_drift`: labels changed where the features did not). Drift is
counted and logged; the action follows the table.

A pure function of what was measured (no model, no I/O), so the table below is testable alone
and documented in the README:

===========================  ==========================  =========================================
served accuracy on batch     nearest child's KL          action
===========================  ==========================  =========================================
>= accuracy_threshold        any                         keep (the served model copes; KL >= kl
                                                         threshold is still logged as drift)
<  accuracy_threshold        <  kl_threshold, and the    retrain that child
                             child does at least as
                             well on the batch as the
                             served model (or it was
                             not measured)
<  accuracy_threshold        <  kl_threshold, but the    the batch looks like the child's data
                             child does worse on it      but the child is no better at it: keep
                             than the served model       when the served model learns every batch
                                                         (it is ahead), else spawn (the labels
                                                         disagree with the child's: a concept
                                                         shift feature KL cannot see)
<  accuracy_threshold        >= kl_threshold, or none    on drift (or when only children learn):
                                                         spawn a child that inherits from the
                                                         served model (inheriting measured better
                                                         than scratch); no drift and the served
                                                         model learns every batch: keep (an
                                                         in-distribution batch it is still weak
                                                         on is its own to learn, not a new child's)
===========================  ==========================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from daemon.learn.drift import concept_drift

Action = Literal["bootstrap", "keep", "retrain", "spawn"]


@dataclass(frozen=True)
class Thresholds:
    kl: float = 0.5
    accuracy: float = 0.70
    concept_alpha: float = 1e-5  # concept drift: batch accuracy this improbably low given the expected


@dataclass(frozen=True)
class Observation:
    accuracy: float                 # served model's accuracy on the batch (before training)
    kl: float                       # KL(batch || served reference), published version's features
    nearest_child: str | None = None
    nearest_kl: float | None = None  # KL(batch || that child's reference), child's features
    nearest_accuracy: float | None = None  # that child's accuracy on the batch (label-aware routing)
    expected_accuracy: float | None = None  # the served model's prequential accuracy so far (concept drift)
    rows: int = 0


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    drift: bool
    child: str | None = None


def decide(obs: Observation, th: Thresholds, served_learns: bool = False) -> Verdict:
    """``served_learns``: the served model trains on every batch (``learner.train_served``)."""
    concept = concept_drift(obs.accuracy, obs.rows, obs.expected_accuracy, th.concept_alpha)
    drift = obs.kl >= th.kl or concept
    if obs.accuracy >= th.accuracy:
        why = "drift but the served model copes" if drift else "in distribution"
        verdict = Verdict("keep", f"{why}: accuracy {obs.accuracy:.3f} >= {th.accuracy}", drift)
    else:
        verdict = _route(obs, th, served_learns, drift)
    if concept and obs.kl < th.kl:
        verdict = replace(verdict, reason=f"{verdict.reason}; concept drift: accuracy {obs.accuracy:.3f} vs "
                                          f"{obs.expected_accuracy:.3f} so far at KL {obs.kl:.3f}")
    return verdict


def _route(obs: Observation, th: Thresholds, served_learns: bool, drift: bool) -> Verdict:
    """Below the accuracy threshold: retrain the nearest child, keep, or spawn (the table above)."""
    if obs.nearest_child is not None and obs.nearest_kl is not None and obs.nearest_kl < th.kl:
        if obs.nearest_accuracy is not None and obs.nearest_accuracy < obs.accuracy:
            if served_learns:
                return Verdict("keep", f"accuracy {obs.accuracy:.3f} < {th.accuracy}; child {obs.nearest_child} is "
                                       f"near (KL {obs.nearest_kl:.3f}) but behind the served model (accuracy "
                                       f"{obs.nearest_accuracy:.3f}), which learns this batch", drift)
            return Verdict("spawn", f"accuracy {obs.accuracy:.3f} < {th.accuracy}; child {obs.nearest_child} is "
                                    f"near (KL {obs.nearest_kl:.3f}) but does worse on the labels (accuracy "
                                    f"{obs.nearest_accuracy:.3f}): a concept shift", drift)
        return Verdict("retrain", f"accuracy {obs.accuracy:.3f} < {th.accuracy}; child {obs.nearest_child} "
                                  f"is near (KL {obs.nearest_kl:.3f} < {th.kl})", drift, child=obs.nearest_child)
    near = "no child" if obs.nearest_child is None else f"nearest child {obs.nearest_child} at KL {obs.nearest_kl:.3f}"
    if served_learns and not drift:
        return Verdict("keep", f"accuracy {obs.accuracy:.3f} < {th.accuracy} but no drift ({near}; served KL "
                               f"{obs.kl:.3f}): the served model learns this batch", drift)
    return Verdict("spawn", f"accuracy {obs.accuracy:.3f} < {th.accuracy}; {near}; served KL {obs.kl:.3f}",
                   drift)


SpawnMethod = Literal["hkt", "copy", "scratch"]


def spawn_method(setting: str, *, compact: bool) -> SpawnMethod:
    """How a new child inherits from the served model (``spawn_method`` setting; ``auto`` is the
    table measured by ``filial bench hkt`` and the engine tests, README "Hereditary knowledge transfer").

    ==========  =====================================================================
    child size  auto
    ==========  =====================================================================
    compact     hkt (inherits leading channels, and the head only when the parent knows
                the slice's classes; then trains with HKT)
    full size   copy (the served weights, fine-tuned)
    ==========  =====================================================================

    Whether the served model recognises the slice's classes
    (:func:`daemon.learn.inherit.spawn.known_classes`) decides what an isolated child learns
    fastest: when it does not (class-incremental or permuted slices), a full-size child from
    scratch beats a copy at 2 epochs. But a child from scratch shares no base with the served
    model, so it can only be merged by distillation, and measured end to end (served accuracy
    after the merge) the copy wins: on MNIST rotated 90° (the parent knows 0.3-0.4 of the classes)
    the served model reaches 0.69 on the slice through a copy and a weight-space merge, 0.59
    through a scratch child and distillation (test_engine's merge scenario, gate rows, one seed).
    So the table does not depend on it; ``scratch`` stays available as a setting.
    """
    if setting != "auto":
        if setting == "copy" and compact:
            raise ValueError("spawn_method 'copy' needs child_size_ratio 1 (use hkt for compact children)")
        return setting  # type: ignore[return-value]
    return "hkt" if compact else "copy"
