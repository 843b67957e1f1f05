"""The merger: a frozen snapshot of what to merge in, a gated candidate out.

:func:`merge` is a function of a :class:`MergeSnapshot` (taken by the engine under its lock) and
the settings: it holds no lock and touches no engine state, so ingest continues while it runs.

Same-size copies of the served weights merge in weight space: the granularity controller picks
method and level on the even rows of each slice's held-out buffer. Compact children (another
architecture) and children trained from scratch (no shared base, so no meaningful task vector)
merge by bidirectional distillation on the replay buffers: the candidate learns from their
ensemble, each learns back from the candidate. The gate (a paired test on per-row correctness,
:func:`daemon.learn.merging.gate.paired_gate`) judges the candidate against the published version
on the odd held-out rows, so it does not inherit the selection's optimism.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from daemon.engine.records import MergeOutcome
from daemon.engine.seeding import seeded
from daemon.engine.settings import LearnerSettings, MergeSettings
from daemon.engine.state import PendingCandidate, cpu_state
from daemon.learn.merging.confirm import Confirmation, worth_confirming
from daemon.learn.merging.distill import CongruentDistillation, distill_into
from daemon.learn.models import Architecture
from daemon.learn.merging.gate import correctness, gate, paired_gate, recency_weights
from daemon.learn.merging.controller import choose_plan
from daemon.learn.merging.plans import apply_plan
from daemon.learn.replay import balanced_rows
from daemon.learn.training import (CrossEntropy, EarlyStopping, Hook, Loss, accuracy, fit, model_input,
                                   predict_logits)

log = logging.getLogger("filial.engine")

Sets = dict[str, tuple[torch.Tensor, torch.Tensor]]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DistillChild:
    updates: int
    architecture: Architecture
    state: StateDict


@dataclass(frozen=True)
class MergeSnapshot:
    """Everything a merge reads, copied out of the engine at one moment."""
    base: StateDict | None           # the weights the children's task vectors are taken against
    served: StateDict                # the published version: what the gate compares against
    working: StateDict | None        # the served model as it has learned since (None: it does not learn)
    working_weight: float            # its sample count, its weight among the merged members
    children: list[StateDict]        # same-size children, in weight space of ``base``
    weights: list[float]             # their sample counts
    ids: list[str]
    distill: dict[str, DistillChild]  # children merged by distillation
    replay: Sets                     # replay rows by slice (distillation and consolidation train on them)
    heldout: Sets
    served_version: int
    base_version: int | None
    architecture: Architecture
    data_type: str
    seed: int
    slice_age: dict[str, int] | None = None  # batches since each slice was last seen (recency weights)


def split_heldout(sets: Sets) -> tuple[Sets, Sets]:
    """Even rows of each slice choose a merge, odd rows judge it (slices with < 2 rows: choose only)."""
    select = {name: (x[0::2], y[0::2]) for name, (x, y) in sets.items()}
    judge = {name: (x[1::2], y[1::2]) for name, (x, y) in sets.items() if len(y) >= 2}
    return select, judge


def weighted_mean(metrics: dict[str, float], weights: dict[str, float] | None = None) -> float:
    """The mean over the slices measured (NaN skipped), weighted by ``weights`` (default equal; a
    slice without a weight counts 1)."""
    pairs = [(v, 1.0 if weights is None else weights.get(k, 1.0)) for k, v in metrics.items() if v == v]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


def slice_weights(snap: MergeSnapshot, settings: MergeSettings) -> dict[str, float] | None:
    """The gate's recency weights, 2^-(batches since a slice was last seen / half-life), which the
    selection uses too: a candidate is chosen and consolidated for what it will be judged on.
    None: every slice the same."""
    if not settings.recency_half_life or snap.slice_age is None:
        return None
    return recency_weights({s: -snap.slice_age.get(s, 0) for s in snap.heldout}, 0, settings.recency_half_life)


def selection_loss(model: torch.nn.Module, data_type: str, select: Sets,
                   recency: dict[str, float] | None) -> float:
    """What consolidation keeps its best epoch by: the mean cross-entropy over the slices' selection
    rows (weighted by ``recency``; lower is better). Measured against the mean accuracy it replaced:
    a few dozen rows a slice move the accuracy by whole rows from one epoch to the next, so patience
    ran out on noise while the model was still learning; the loss moves smoothly (README "Consolidation")."""
    losses = {name: float(F.cross_entropy(predict_logits(model, model_input(x, data_type)), y))
              for name, (x, y) in select.items() if len(y)}
    return weighted_mean(losses, recency)


def heldout_accuracy(model: torch.nn.Module, data_type: str, sets: Sets) -> dict[str, float]:
    """Accuracy per slice on ``{slice: (x, y)}``, rounded as metrics and merge records report it."""
    return {name: round(accuracy(model, model_input(x, data_type), y), 4) for name, (x, y) in sets.items()}


class Evaluator:
    """Held-out accuracy per slice of a state dict, in one reusable model of the served architecture."""

    def __init__(self, arch: Architecture, data_type: str, device: torch.device) -> None:
        with seeded(0):  # weights are loaded over these: only keep the global RNG untouched
            self.model = arch.build().to(device)
        self.data_type = data_type

    def __call__(self, state: StateDict, sets: Sets) -> dict[str, float]:
        self.model.load_state_dict(state)
        return heldout_accuracy(self.model, self.data_type, sets)

    def correct(self, state: StateDict, sets: Sets) -> dict[str, torch.Tensor]:
        """Which rows of each slice ``state`` gets right (what the paired gate compares)."""
        self.model.load_state_dict(state)
        return correctness(self.model, sets, self.data_type)


def _accuracies(rows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(r.float().mean().item(), 4) if len(r) else float("nan") for k, r in rows.items()}


def merge(snap: MergeSnapshot, settings: MergeSettings, learner: LearnerSettings,
          device: torch.device) -> MergeOutcome:
    """The candidate: the children merged in weight space (with the served model's own progress as
    one more member), or the served model as it has learned when that scores better on the
    selection rows; then children of other shapes distilled in; then the gate against the
    published version."""
    started = time.perf_counter()
    select, judge = split_heldout(snap.heldout)
    evaluate = Evaluator(snap.architecture, snap.data_type, device)
    members, weights, ids = list(snap.children), list(snap.weights), list(snap.ids)
    if snap.working is not None and members:
        members, weights, ids = [snap.working, *members], [snap.working_weight, *weights], ["served", *ids]
    plan: dict[str, Any] = {"children": snap.ids, "weights": dict(zip(ids, weights)),
                            "selection_rows": sum(len(y) for _, y in select.values()),
                            "gate_rows": sum(len(y) for _, y in judge.values())}
    state = snap.working if snap.working is not None else snap.served
    # the served model as trained, scored once on the selection rows (the merge and consolidation compare with it)
    recency = slice_weights(snap, settings)
    working_score = weighted_mean(evaluate(snap.working, select), recency) if snap.working is not None else None
    if members:
        merged, chosen = _weight_merge(snap, members, weights, settings, evaluate, select)
        plan.update(chosen)
        if working_score is not None and working_score >= weighted_mean(evaluate(merged, select), recency):
            plan["chosen"] = "served model as trained (scores at least the merge on the selection rows)"
        else:
            state = merged
    distilled: dict[str, tuple[int, StateDict]] = {}
    if snap.distill:
        state, distilled, report = _distill(snap, state, learner, device)
        plan["distill"] = {"children": list(distilled), **report}
    takes = False
    if settings.consolidate_epochs and snap.replay:
        state, plan["consolidate"] = _consolidate(snap, state, select, recency, settings, learner, device)
        if working_score is not None:
            takes = weighted_mean(evaluate(state, select), recency) >= working_score
            plan["consolidate"]["working_takes_candidate"] = takes
    served_rows, cand_rows = evaluate.correct(snap.served, judge), evaluate.correct(state, judge)
    verdict = paired_gate(served_rows, cand_rows, weights=recency, tolerance=settings.tolerance,
                          alpha=settings.alpha, guard_alpha=settings.guard_alpha)
    served_metrics, cand_metrics = _accuracies(served_rows), _accuracies(cand_rows)
    return MergeOutcome(verdict.accepted, verdict.reason, state, snap.ids + list(distilled), snap.base_version,
                        snap.served_version, served_metrics, cand_metrics, plan, verdict,
                        time.perf_counter() - started, distilled, snap.working, takes,
                        judged=(served_rows, cand_rows))


def hold_for_confirmation(snap: MergeSnapshot, outcome: MergeOutcome,
                          settings: MergeSettings) -> PendingCandidate | None:
    """The candidate to confirm on fresh rows (``merge.confirm_alpha``, :mod:`daemon.learn.merging.confirm`)
    when the gate rejected it only for a gain not yet significant; None otherwise, and for a merge that
    took other learners' contributions: each of them carries its progress from the contribution the
    leader's published merge names, and keeps only its last few, so a candidate published batches later
    would name one it may no longer hold (it would then carry its progress twice; found by ``make scale``)."""
    if (not settings.confirm_alpha or outcome.state is None or outcome.verdict is None or outcome.judged is None
            or any(i.startswith("learner:") for i in snap.ids) or outcome.foreign_heldout
            or not worth_confirming(outcome.verdict)):
        return None
    served_rows, candidate_rows = outcome.judged
    confirmation = Confirmation(served_rows, candidate_rows, slice_weights(snap, settings), settings.confirm_alpha,
                                settings.tolerance, settings.guard_alpha)
    return PendingCandidate(replace(outcome, held=True), snap.served_version, confirmation)


def confirmed_outcome(pending: PendingCandidate) -> MergeOutcome:
    """A confirmed candidate as an accepted merge, its record saying how it was confirmed. Its adoption
    keeps what the served model learned meanwhile: when the served model took the candidate at the
    rejection it has built on it since, so the candidate's own weights are the point it learned from."""
    c, o, verdict = pending.confirmation, pending.outcome, pending.confirmation.confirmed
    plan = {**(o.plan or {}), "confirmation": {"looks": c.looks, "fresh_rows": c.fresh_rows,
                                               "alpha": c.look_alpha(c.looks), "rejected_as": o.reason}}
    return replace(o, accepted=True, reason=f"confirmed on {c.fresh_rows} fresh rows at look {c.looks}: {verdict.reason}",
                   plan=plan, verdict=verdict, served_metrics={s.slice: round(s.served, 4) for s in verdict.slices},
                   candidate_metrics={s.slice: round(s.candidate, 4) for s in verdict.slices}, seconds=0.0,
                   distilled_children={}, working_state=o.state if o.working_takes_candidate else o.working_state,
                   working_takes_candidate=False, confirmed=True, held=False, judged=None)


def consolidate_working(snap: MergeSnapshot, settings: MergeSettings, learner: LearnerSettings,
                        device: torch.device) -> tuple[StateDict, bool, dict[str, Any]]:
    """What a learner that does not lead does at its merge tick: its served model as trained,
    consolidated on every slice's replay rows as a merge candidate is, and whether it scores at least
    as well on the selection rows (then the learner builds on it, as one learner's served model takes
    a rejected merge's candidate). Nothing is gated: nothing is published from here."""
    select, _ = split_heldout(snap.heldout)
    evaluate = Evaluator(snap.architecture, snap.data_type, device)
    recency = slice_weights(snap, settings)
    before = weighted_mean(evaluate(snap.working, select), recency)
    state, report = _consolidate(snap, snap.working, select, recency, settings, learner, device)
    return state, weighted_mean(evaluate(state, select), recency) >= before, report


def _weight_merge(snap: MergeSnapshot, members: list[StateDict], weights: list[float], settings: MergeSettings,
                  evaluate: Evaluator, select: Sets) -> tuple[StateDict, dict]:
    """Same-size members: the controller's plan, or the best one that passes the gate."""
    result = choose_plan(snap.base, members, weights, lambda state: evaluate(state, select),
                         method=settings.method, level=settings.level, group_prefixes=settings.groups,
                         min_gain=settings.min_gain, max_evaluations=settings.max_evaluations)
    fallback = _admissible_fallback(result, evaluate(snap.served, select), settings.tolerance)
    chosen = result.plan.label()
    state = result.state
    if fallback is not None:
        state = apply_plan(fallback.plan, snap.base, members, weights)
        log.info("merge: the controller's pick %s regresses a slice on the selection rows; "
                 "taking the best candidate that does not: %s", chosen, fallback.plan.label())
        chosen = fallback.plan.label()
    return state, {**result.to_dict(), "chosen": chosen, "gate_fallback": fallback is not None}


def _admissible_fallback(result, served_on_selection: dict[str, float], tolerance: float):
    """When the controller's pick (best mean) would fail the gate on the selection rows, the
    best-scoring candidate that would pass, if any: a smaller merge that publishes beats a
    larger one that is rejected. None when the pick is fine or nothing passes."""
    def passes(candidate) -> bool:
        return gate(served_on_selection, candidate.per_slice, tolerance).accepted

    if result.score is None or passes(result.score):
        return None
    admissible = [c for c in result.candidates
                  if passes(c) and weighted_mean(c.per_slice) > weighted_mean(served_on_selection)]
    return max(admissible, key=lambda c: (c.mean, c.worst), default=None)


def _distill(snap: MergeSnapshot, state: StateDict, learner: LearnerSettings, device: torch.device):
    """Children outside the served weight space into the candidate: bidirectional ensemble
    distillation on the replay buffers."""
    with seeded(0):  # weights are loaded over these: only keep the global RNG untouched
        candidate = snap.architecture.build().to(device)
        students_models = {node_id: child.architecture.build().to(device) for node_id, child in snap.distill.items()}
    candidate.load_state_dict(state)
    students = {}
    for node_id, child in snap.distill.items():
        model = students_models[node_id]
        model.load_state_dict(child.state)
        students[node_id] = (child.updates, model)
    x, y = torch.cat([x for x, _ in snap.replay.values()]), torch.cat([y for _, y in snap.replay.values()])
    report = distill_into(candidate, [m for _, m in students.values()], model_input(x, snap.data_type), y,
                          epochs=learner.child_epochs, lr=learner.learning_rate,
                          batch_size=learner.train_batch_size, generator=torch.Generator().manual_seed(snap.seed))
    distilled = {node_id: (updates, cpu_state(m)) for node_id, (updates, m) in students.items()}
    return cpu_state(candidate), distilled, report.to_dict()


def _consolidate(snap: MergeSnapshot, state: StateDict, select: Sets, recency: dict[str, float] | None,
                 settings: MergeSettings, learner: LearnerSettings,
                 device: torch.device) -> tuple[StateDict, dict[str, Any]]:
    """Rehearsal consolidation (:func:`rehearse`) of the candidate ``state``, seeded by the snapshot."""
    with seeded(0):  # weights are loaded over these: only keep the global RNG untouched
        model = snap.architecture.build().to(device)
    model.load_state_dict(state)
    teacher = (snap.architecture.build_with(snap.served, device) if settings.consolidate_congruence else None)
    report = rehearse(model, snap.replay, select, snap.data_type, settings, learner,
                      torch.Generator().manual_seed(snap.seed), recency=recency, teacher=teacher)
    return cpu_state(model), report


def rehearse(model: torch.nn.Module, replay: Sets, select: Sets, data_type: str, settings: MergeSettings,
             learner: LearnerSettings, generator: torch.Generator, *, recency: dict[str, float] | None = None,
             teacher: torch.nn.Module | None = None, min_epoch_rows: int = 0) -> dict[str, Any]:
    """Rehearsal consolidation: ``model`` trains, in place, on an equal share of every slice's replay rows.

    Children and the served model learn each batch with the new slice in the majority; weight-space
    merging then adds what they learned without re-balancing it. Epochs over slice-balanced replay
    (GDumb's balanced memory, Prabhu et al. 2020, used as a fine-tuning step rather than a retrain
    from scratch) turn the candidate into one that serves every slice seen, which is what the gate
    then checks on held-out rows no training step has seen. With ``consolidate_patience`` the
    epochs stop once the mean cross-entropy on the selection rows (:func:`selection_loss`) has not
    fallen for that many, and
    the best epoch's weights are kept: a stream that needs many passes gets them, one that does
    not stops early (the gate's rows are the other half, so this choice does not flatter it). The
    first model a paused bootstrap trains (:meth:`daemon.engine.learner.Learner.finish_bootstrap_idle`)
    goes through the same steps. ``teacher``: the published version, for positive-congruent
    consolidation (``consolidate_congruence``). ``min_epoch_rows``: an epoch of fewer rows takes more
    of each slice (repeated), so that patience, counted in epochs, spans that many rows of optimizer
    steps. Returns the report a merge's plan records.
    """
    started = time.perf_counter()
    per_slice = min(settings.consolidate_rows_per_slice, max(len(y) for _, y in replay.values()),
                    max(1, settings.consolidate_max_rows // len(replay)))
    per_slice = max(per_slice, math.ceil(min_epoch_rows / len(replay)))
    x, y = balanced_rows(replay, per_slice, generator)
    hooks: tuple[Hook, ...] = ()
    stopper = None
    if settings.consolidate_patience and select:
        stopper = EarlyStopping(lambda m: -selection_loss(m, data_type, select, recency),
                                settings.consolidate_patience).start(model)
        hooks = (stopper,)
    loss: Loss = CrossEntropy(learner.label_smoothing)
    if teacher is not None:
        loss = CongruentDistillation(teacher, settings.consolidate_congruence, label_smoothing=learner.label_smoothing)
    history = fit(model, model_input(x, data_type), y, epochs=settings.consolidate_epochs,
                  lr=learner.learning_rate, batch_size=learner.train_batch_size,
                  loss=loss, hooks=hooks, generator=generator)
    report: dict[str, Any] = {"epochs": len(history), "rows_per_slice": per_slice, "slices": len(replay),
                              "loss": round(history[-1]["total"], 4) if history else None,
                              "congruence": settings.consolidate_congruence}
    if stopper is not None:
        stopper.restore_best(model)
        report.update(best_epoch=stopper.best_epoch, selection_loss=[round(-v, 4) for v in stopper.scores])
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
