"""The granularity controller: which plan merges the children, chosen by held-out accuracy.

The engine's one entry point::

    result = choose_plan(base_state, child_states, weights, score_fn,
                         method="auto",          # or a name of METHODS: pinned method
                         level="auto",           # or "model" | "group" | "layer": pinned level
                         group_prefixes=None,    # {"features": ["stages."], "head": ["head."]}
                         max_evaluations=100)    # hard cap on score_fn calls
    result.state            # merged state dict: load it into a model, gate it, publish it
    result.plan.to_dict()   # the chosen plan (re-apply with apply_plan(MergePlan.from_dict(d), ...))
    result.to_dict()        # for the manifest: mode, plan, its score, every candidate's scores

- ``base_state``: the version the children descend from (their task vectors are measured from it);
  ``child_states``: same keys and shapes, oldest first (MagMax's ties go to the newest);
  ``weights``: one per child, relative (e.g. sample counts; scaled to mean 1 inside).
- ``score_fn(state_dict) -> {slice_name: accuracy}`` on held-out data of the slices seen so far.
  The controller only compares the numbers it returns. It is called once per candidate, at most
  ``max_evaluations`` times; use held-out samples that the publish gate does not also judge by,
  or the gate inherits the selection's optimism.
- ``method`` and ``level`` are what the settings pin. ``method="ties", level="model"``: exactly
  that method at its default parameters, no search (``score_fn`` optional: when given it is
  called once so the manifest records the figure). ``method="ties"`` with ``level`` ``"group"``,
  ``"layer"`` or ``"auto"``: that method only, its lambda searched per unit up to that level.
  ``method="auto"``: every method searched, up to ``level``. A plan coarser than the pinned level
  is recorded at the pinned level (the same merge).

Search (auto mode). A candidate scores by its mean accuracy over slices; it replaces the
incumbent only when it adds more than ``min_gain`` (default 0.02) to that mean. So the baseline
(``average`` at its defaults, or the pinned method at its defaults) and coarser plans win
near-ties. Why 0.02: the held-out estimate of a difference between two merges of the same
children has a standard error of about ``sqrt(d/n)`` (``d`` the share of samples they disagree
on, ~0.1; ``n`` the held-out samples, a few hundred to a few thousand), about 0.01, and the search
takes the best of dozens of candidates: a smaller margin mostly selects noise, which then costs
accuracy on unseen data. With M methods, S lambda scales, G groups and L layers:

1. model level: the baseline, then every method at every scale ``s * default lam``
   (``M*S`` evaluations, +1 when the baseline is not in that grid);
2. group level: from the incumbent, for each group in turn try every other (method, scale) for
   that group alone and keep the best (``G*(M*S-1)`` evaluations);
3. layer level: the same per layer, from the incumbent (``L*(M*S-1)`` evaluations).

A finer level whose evaluations do not fit in what is left of ``max_evaluations`` is skipped
(recorded in ``result.skipped_levels``), so the cost is bounded whatever the model's depth. With
the defaults (4 methods, scales 0.5/1/1.5) an ``image_cnn`` (2 groups, 4 layers) costs
12 + 2*11 + 4*11 = 78 evaluations; a model with more than 6 layers skips the layer level.
Each (method, parameters other than lam) is merged once per tensor and cached
(:class:`~daemon.learn.merging.plans.MergedTaskVectors`); a candidate then costs one pass over the
parameters to assemble plus one ``score_fn`` call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from daemon.learn.merging.methods import METHODS, StateDict
from daemon.learn.merging.plans import (LEVELS, MODEL_UNIT, MergedTaskVectors, MergePlan, Prefixes, UnitPlan,
                                        normalise_prefixes, mergeable_keys)

AUTO = "auto"
DEFAULT_SCALES = (0.5, 1.0, 1.5)
DEFAULT_MAX_EVALUATIONS = 100
DEFAULT_MIN_GAIN = 0.02

ScoreFn = Callable[[StateDict], Mapping[str, float]]


@dataclass(frozen=True)
class CandidateScore:
    plan: MergePlan
    per_slice: dict[str, float]

    def _finite(self) -> list[float]:
        return [v for v in self.per_slice.values() if not math.isnan(v)]

    @property
    def mean(self) -> float:
        vals = self._finite()
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def worst(self) -> float:
        vals = self._finite()
        return min(vals) if vals else float("nan")

    def to_dict(self) -> dict:
        return {"plan": self.plan.label(), "level": self.plan.level, "mean": round(self.mean, 6),
                "worst": round(self.worst, 6), "per_slice": {k: round(v, 6) for k, v in self.per_slice.items()}}


@dataclass
class MergeResult:
    """What a merge produced: the plan, the merged state and every candidate's held-out scores."""
    plan: MergePlan
    state: dict[str, torch.Tensor]
    score: CandidateScore | None
    candidates: list[CandidateScore]
    best_by_level: dict[str, CandidateScore]
    mode: str                                      # "auto" or "pinned"
    skipped_levels: list[str] = field(default_factory=list)
    merge_seconds: float = 0.0                     # merging task vectors
    search_seconds: float = 0.0                    # everything, score_fn calls included

    @property
    def evaluations(self) -> int:
        return len(self.candidates)

    def to_dict(self) -> dict:
        """For the manifest: the plan (re-applicable), its score, all candidates' scores."""
        return {"mode": self.mode, "plan": self.plan.to_dict(), "plan_label": self.plan.label(),
                "score": self.score.to_dict() if self.score else None,
                "best_by_level": {lvl: c.to_dict() for lvl, c in self.best_by_level.items()},
                "candidates": [c.to_dict() for c in self.candidates],
                "evaluations": self.evaluations, "skipped_levels": list(self.skipped_levels),
                "merge_seconds": round(self.merge_seconds, 4), "search_seconds": round(self.search_seconds, 4)}


def better(a: CandidateScore, b: CandidateScore | None, min_gain: float = 0.0) -> bool:
    """``a`` replaces ``b``: its mean held-out accuracy is higher by more than ``min_gain``.

    Ties keep ``b`` (the earlier, simpler candidate). The worst slice does not break ties: with
    accuracies counted on a few hundred samples, equal means are common, and preferring the one
    with the better worst slice only follows noise (the publish gate guards the worst slice).
    A NaN mean never wins.
    """
    if math.isnan(a.mean):
        return False
    if b is None or math.isnan(b.mean):
        return True
    return a.mean - b.mean > min_gain + 1e-9


class GranularityController:
    """Chooses level and method(s) per merge by held-out accuracy, or applies a pinned plan.

    ``methods``: methods searched (names, or :class:`UnitPlan` for non-default parameters);
    ``scales``: lambda multipliers tried per method (``lam = scale * default lam``);
    ``levels``: levels searched (model is always scored); ``group_prefixes``: layer groups by
    name prefix; ``baseline``: a model-level unit scored first (default plain ``average``), so
    the pick never loses to it on the held-out data; ``min_gain``: see the module docstring;
    ``max_evaluations``: cap on ``score_fn`` calls (finer levels that do not fit are skipped);
    ``pinned``: ``(level, UnitPlan)`` applied to every unit of that level, no search.
    """

    def __init__(self, methods: Sequence[str | UnitPlan] = tuple(METHODS),
                 scales: Sequence[float] = DEFAULT_SCALES,
                 levels: Sequence[str] = LEVELS,
                 group_prefixes: Prefixes | None = None,
                 baseline: UnitPlan | str | None = "average",
                 min_gain: float = DEFAULT_MIN_GAIN,
                 max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
                 pinned: tuple[str, UnitPlan] | None = None) -> None:
        self.methods = [m if isinstance(m, UnitPlan) else UnitPlan(m) for m in methods]
        if not self.methods and pinned is None:
            raise ValueError("the controller needs at least one method")
        self.scales = tuple(float(s) for s in scales) or (1.0,)
        bad = [lvl for lvl in levels if lvl not in LEVELS]
        if bad:
            raise ValueError(f"unknown levels {bad}; use {LEVELS}")
        self.levels = tuple(lvl for lvl in LEVELS if lvl in levels or lvl == "model")
        self.group_prefixes = normalise_prefixes(group_prefixes)
        self.baseline = UnitPlan(baseline) if isinstance(baseline, str) else baseline
        self.min_gain = float(min_gain)
        self.max_evaluations = int(max_evaluations)
        if pinned is not None and (pinned[0] not in LEVELS or not isinstance(pinned[1], UnitPlan)):
            raise ValueError(f"pinned must be (level, UnitPlan) with level in {LEVELS}")
        self.pinned = pinned

    @classmethod
    def pin(cls, level: str, method_name: str, group_prefixes: Prefixes | None = None,
            **params) -> "GranularityController":
        """Pinned mode: ``method_name`` (with ``params``) for every unit of ``level``."""
        return cls(methods=(), group_prefixes=group_prefixes, pinned=(level, UnitPlan(method_name, params)))

    def candidate_units(self) -> list[UnitPlan]:
        """Every (method, scale) tried per unit, in order, without duplicates."""
        out: list[UnitPlan] = []
        for m in self.methods:
            for s in self.scales:
                unit = m.scaled(s) if s != 1.0 else m
                if unit not in out:
                    out.append(unit)
        return out

    def _model_units(self) -> list[UnitPlan]:
        units = self.candidate_units()
        if self.baseline is None:
            return units
        return [self.baseline] + [u for u in units if u != self.baseline]

    def _level_cost(self, level: str, keys: list[str]) -> int:
        if level == "model":
            return len(self._model_units())
        units = MergePlan.uniform(level, self.methods[0], keys, self.group_prefixes).units
        return len(units) * (len(self.candidate_units()) - 1)

    def merge(self, base_state: StateDict, child_states: Sequence[StateDict],
              weights: Sequence[float] | None = None, score_fn: ScoreFn | None = None) -> MergeResult:
        """Merge ``child_states`` into ``base_state`` (the version they descend from)."""
        start = time.perf_counter()
        merged = MergedTaskVectors(base_state, child_states, weights)
        candidates: list[CandidateScore] = []

        def score(plan: MergePlan) -> CandidateScore:
            result = CandidateScore(plan, {k: float(v) for k, v in score_fn(merged.state(plan)).items()})
            candidates.append(result)
            return result

        if self.pinned is not None:
            plan = MergePlan.uniform(*self.pinned, merged.keys, self.group_prefixes)
            chosen = score(plan) if score_fn is not None else None
            return MergeResult(plan, merged.state(plan), chosen, candidates,
                               {plan.level: chosen} if chosen else {}, "pinned",
                               merge_seconds=merged.seconds, search_seconds=time.perf_counter() - start)
        if score_fn is None:
            raise ValueError("auto mode needs a score_fn (or pin a method and a level)")

        incumbent: CandidateScore | None = None
        for unit in self._model_units():
            candidate = score(MergePlan("model", {MODEL_UNIT: unit}))
            if better(candidate, incumbent, self.min_gain):
                incumbent = candidate
        best_by_level = {"model": incumbent}
        skipped = []
        for level in self.levels[1:]:
            if len(candidates) + self._level_cost(level, merged.keys) > self.max_evaluations:
                skipped.append(level)
                continue
            level_best = self._refine(incumbent, level, merged.keys, score)
            best_by_level[level] = level_best
            if better(level_best, incumbent, self.min_gain):
                incumbent = level_best
        return MergeResult(incumbent.plan, merged.state(incumbent.plan), incumbent, candidates, best_by_level,
                           "auto", skipped, merged.seconds, time.perf_counter() - start)

    def _refine(self, incumbent: CandidateScore, level: str, keys: list[str],
                score: Callable[[MergePlan], CandidateScore]) -> CandidateScore:
        """Coordinate search: each unit of ``level`` in turn tries every other candidate unit."""
        # the incumbent's merge expressed at this level is the same state, so its scores carry over
        best = CandidateScore(incumbent.plan.at_level(level, keys, self.group_prefixes), incumbent.per_slice)
        for name in best.plan.unit_keys(keys):
            current = best.plan.units[name]
            for unit in self.candidate_units():
                if unit != current:
                    candidate = score(best.plan.with_unit(name, unit))
                    if better(candidate, best, self.min_gain):
                        best = candidate
        return best


def choose_plan(base_state: StateDict, child_states: Sequence[StateDict], weights: Sequence[float] | None,
                score_fn: ScoreFn | None, *, method: str = AUTO, level: str = AUTO,
                group_prefixes: Prefixes | None = None, scales: Sequence[float] = DEFAULT_SCALES,
                min_gain: float = DEFAULT_MIN_GAIN, max_evaluations: int = DEFAULT_MAX_EVALUATIONS) -> MergeResult:
    """The engine's entry point; see the module docstring for the arguments and the modes."""
    if level != AUTO and level not in LEVELS:
        raise ValueError(f"merge level must be {AUTO!r} or one of {LEVELS}, got {level!r}")
    if method != AUTO and method not in METHODS:
        raise ValueError(f"merge method must be {AUTO!r} or one of {sorted(METHODS)}, got {method!r}")
    levels = LEVELS if level == AUTO else LEVELS[:LEVELS.index(level) + 1]
    if method != AUTO and level == "model":
        controller = GranularityController.pin("model", method)
    else:
        controller = GranularityController(methods=tuple(METHODS) if method == AUTO else (method,),
                                           baseline="average" if method == AUTO else method,
                                           levels=levels, group_prefixes=group_prefixes, scales=scales,
                                           min_gain=min_gain, max_evaluations=max_evaluations)
    result = controller.merge(base_state, child_states, weights, score_fn)
    if level != AUTO and result.plan.level != level:
        # a coarser plan won: record it at the level the settings asked for (the same merge)
        result.plan = result.plan.at_level(level, mergeable_keys(base_state), group_prefixes)
        result.score = CandidateScore(result.plan, result.score.per_slice) if result.score else None
    return result
