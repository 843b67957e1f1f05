"""Merge plans and the granularity controller (seed 003).

A :class:`MergePlan` merges a model as one unit (level ``"model"``), per layer group (``"group"``:
groups from the module tree by name prefix, default ``features`` = ``stages.*``, ``head`` =
``head.*``) or per layer (``"layer"``: one unit per module, i.e. a parameter name minus its last
component). Each unit names a method of :data:`daemon.merge.METHODS`, its parameters (``lam`` and
the method's own) and optionally its own child weights. Plans are JSON-serialisable
(:meth:`MergePlan.to_dict` / :meth:`MergePlan.from_dict`) for the manifest and the settings.

The engine's call::

    controller = GranularityController()                    # auto: search on held-out data
    # pinned: GranularityController.pin("group", "ties", density=0.1)
    #     or GranularityController(pinned=MergePlan.from_dict(settings_plan))
    result = controller.merge(base_state, child_states, weights, evaluate)
    result.state            # merged state dict (tensors), ready for the gate and the store
    result.to_dict()        # {"plan": ..., "score": ..., "candidates": [...], "evaluations": n}

``evaluate(state_dict) -> {slice_name: accuracy}`` is supplied by the caller (held-out buffers of
the slices seen so far); the controller does no I/O. A candidate scores by its mean accuracy over
slices, the worst slice breaking ties; a later candidate replaces the incumbent only when strictly
better (mean gain > ``min_gain``, or equal mean and a better worst slice), so simpler plans win ties.

Search (auto mode), with M methods, S lambda scales, G groups and L layers:

1. model level: every method at every scale ``s * default lam`` (M*S evaluations), plus the
   ``baseline`` (``average`` at its defaults) if that is not already in the grid, so the chosen
   plan is never worse than the baseline on the held-out data;
2. group level: start from the incumbent, then for each group in turn try every other
   (method, scale) for that group alone and keep the best (G*(M*S-1) evaluations);
3. layer level: the same per layer, starting from the incumbent (L*(M*S-1) evaluations).

Total ``M*S [+1] + (G+L)*(M*S-1)``; with the defaults (4 methods, scales 0.5/1/1.5) and an
``image_cnn`` (2 groups, 4 layers) that is 12 + 6*11 = 78 evaluations. The merged task vector of
each (method, params-without-lam, weights) is computed once and cached, so a candidate costs one
``evaluate`` plus a cheap tensor assembly; no candidate re-merges.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from daemon.merge import METHODS, StateDict, merge_keys, merged_task_vector

LEVELS = ("model", "group", "layer")
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"features": ("stages.",), "head": ("head.",)}
OTHER_GROUP = "other"
MODEL_UNIT = "model"

Evaluate = Callable[[StateDict], Mapping[str, float]]


# ---------------------------------------------------------------------------- units

def _normalise_prefixes(prefixes: Mapping[str, str | Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    source = DEFAULT_GROUPS if prefixes is None else prefixes
    return {name: (p,) if isinstance(p, str) else tuple(p) for name, p in source.items()}


def layer_groups(state_keys: Iterable[str],
                 prefixes: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Group names -> keys, by name prefix (first matching group in order wins).

    Default groups: ``features`` (``stages.``) and ``head`` (``head.``). Keys matching no prefix
    go to ``other``. Empty groups are left out.
    """
    groups = _normalise_prefixes(prefixes)
    out: dict[str, list[str]] = {name: [] for name in groups}
    out[OTHER_GROUP] = out.get(OTHER_GROUP, [])
    for key in state_keys:
        for name, pres in groups.items():
            if any(key.startswith(p) for p in pres):
                out[name].append(key)
                break
        else:
            out[OTHER_GROUP].append(key)
    return {name: keys for name, keys in out.items() if keys}


def layer_name(key: str) -> str:
    """The module a parameter belongs to: ``stages.0.0.weight -> stages.0.0``, ``bias -> bias``."""
    module, sep, _ = key.rpartition(".")
    return module if sep else key


def layers(state_keys: Iterable[str]) -> dict[str, list[str]]:
    """One unit per module (key minus its final component), in first-seen order."""
    out: dict[str, list[str]] = {}
    for key in state_keys:
        out.setdefault(layer_name(key), []).append(key)
    return out


# ---------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class UnitPlan:
    """What one unit gets: a method, its parameters, optionally its own child weights."""
    method: str
    params: dict = field(default_factory=dict)
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; known: {sorted(METHODS)}")
        # store the full parameters (defaults filled in) so equal merges compare equal
        object.__setattr__(self, "params", METHODS[self.method].params(**self.params))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(x) for x in self.weights))

    @property
    def full_params(self) -> dict:
        return dict(self.params)

    @property
    def lam(self) -> float:
        return float(self.full_params["lam"])

    def merge_key(self) -> tuple:
        """Everything but lam: units sharing it share one merged task vector."""
        rest = tuple(sorted((k, v) for k, v in self.full_params.items() if k != "lam"))
        return self.method, rest, self.weights

    def label(self) -> str:
        extra = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in sorted(self.full_params.items()))
        return f"{self.method}({extra})"

    def to_dict(self) -> dict:
        d = {"method": self.method, "params": self.full_params}
        if self.weights is not None:
            d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "UnitPlan":
        w = d.get("weights")
        return cls(d["method"], dict(d.get("params", {})), tuple(float(x) for x in w) if w else None)

    def scaled(self, scale: float) -> "UnitPlan":
        return UnitPlan(self.method, {**self.params, "lam": round(self.lam * scale, 10)},
                        self.weights)


@dataclass(frozen=True)
class MergePlan:
    """A level and, per unit at that level, the :class:`UnitPlan` to merge it with.

    ``groups`` (group level) are the name prefixes the units were built from, so the plan can be
    applied to any state dict. ``default`` covers keys in no listed unit (e.g. a layer added
    later); without it such keys are an error.
    """
    level: str
    units: dict[str, UnitPlan]
    groups: dict[str, tuple[str, ...]] | None = None
    default: UnitPlan | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"plan level must be one of {LEVELS}, got {self.level!r}")
        if self.level == "model" and set(self.units) != {MODEL_UNIT}:
            raise ValueError(f"a model-level plan has exactly one unit named {MODEL_UNIT!r}")

    @classmethod
    def uniform(cls, level: str, unit: UnitPlan, state_keys: Iterable[str],
                prefixes: Mapping[str, str | Sequence[str]] | None = None) -> "MergePlan":
        """The same method for every unit of ``level``."""
        keys = list(state_keys)
        if level == "model":
            return cls("model", {MODEL_UNIT: unit})
        if level == "group":
            groups = _normalise_prefixes(prefixes)
            return cls("group", {g: unit for g in layer_groups(keys, groups)}, groups)
        if level == "layer":
            return cls("layer", {name: unit for name in layers(keys)})
        raise ValueError(f"plan level must be one of {LEVELS}, got {level!r}")

    def unit_keys(self, state_keys: Iterable[str]) -> dict[str, list[str]]:
        """Unit name -> the keys of ``state_keys`` it merges (unit names not in the plan included)."""
        keys = list(state_keys)
        if self.level == "model":
            return {MODEL_UNIT: keys}
        if self.level == "group":
            return layer_groups(keys, self.groups)
        return layers(keys)

    def assignments(self, state_keys: Iterable[str]) -> list[tuple[UnitPlan, list[str]]]:
        out = []
        for name, keys in self.unit_keys(state_keys).items():
            unit = self.units.get(name, self.default)
            if unit is None:
                raise KeyError(f"{self.level}-level plan has no unit {name!r} (keys {keys[:3]}...) "
                               "and no default")
            out.append((unit, keys))
        return out

    def with_unit(self, name: str, unit: UnitPlan) -> "MergePlan":
        return MergePlan(self.level, {**self.units, name: unit}, self.groups, self.default)

    def at_level(self, level: str, state_keys: Iterable[str],
                 prefixes: Mapping[str, str | Sequence[str]] | None = None) -> "MergePlan":
        """The same merge expressed at a finer level (each new unit inherits its old unit's plan).

        ``prefixes`` name the groups when refining a model-level plan to groups.
        """
        keys = list(state_keys)
        if level == self.level:
            return self
        if level not in LEVELS or LEVELS.index(level) < LEVELS.index(self.level):
            raise ValueError(f"cannot turn a {self.level}-level plan into a {level!r}-level one")
        owner = {k: unit for unit, ks in self.assignments(keys) for k in ks}
        finer = MergePlan.uniform(level, UnitPlan("average"), keys, self.groups or prefixes)
        units = {}
        for name, ks in finer.unit_keys(keys).items():
            units[name] = owner[ks[0]]
            if any(owner[k] != units[name] for k in ks):
                raise ValueError(f"unit {name!r} spans keys with different plans")
        return MergePlan(level, units, finer.groups, self.default)

    def label(self) -> str:
        if len({u.label() for u in self.units.values()}) == 1:
            return f"{self.level}:{next(iter(self.units.values())).label()}"
        return f"{self.level}:" + ";".join(f"{n}={u.label()}" for n, u in self.units.items())

    def to_dict(self) -> dict:
        d: dict = {"level": self.level, "units": {n: u.to_dict() for n, u in self.units.items()}}
        if self.groups is not None:
            d["groups"] = {g: list(p) for g, p in self.groups.items()}
        if self.default is not None:
            d["default"] = self.default.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MergePlan":
        groups = d.get("groups")
        return cls(d["level"], {n: UnitPlan.from_dict(u) for n, u in d["units"].items()},
                   {g: tuple(p) for g, p in groups.items()} if groups is not None else None,
                   UnitPlan.from_dict(d["default"]) if d.get("default") else None)


def apply_plan(plan: MergePlan, base_state: StateDict, child_states: Sequence[StateDict],
               weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Merge every unit with its own method (``merge_state`` semantics restricted to its keys).

    A unit's own ``weights`` override ``weights``. Keys no unit merges (integer buffers) are
    copied from the base.
    """
    merged: dict[str, torch.Tensor] = {}
    for unit, keys in plan.assignments(mergeable_keys(base_state)):
        w = unit.weights if unit.weights is not None else weights
        merged.update(merge_keys(unit.method, base_state, child_states, w, keys, **unit.params))
    return {name: merged[name] if name in merged else t.clone() for name, t in base_state.items()}


def mergeable_keys(state: StateDict) -> list[str]:
    """The keys a plan covers: floating tensors (integer buffers are copied from the base)."""
    return [k for k, t in state.items() if t.is_floating_point()]


class _TaskVectorCache:
    """Merged task vectors (before lam) per (method, params, weights); a plan becomes a state cheaply.

    ``state(plan)`` equals ``apply_plan(plan, ...)`` bit for bit (same float32 arithmetic).
    """

    def __init__(self, base: StateDict, children: Sequence[StateDict], weights: Sequence[float] | None):
        self.base, self.children, self.weights = base, children, weights
        self.float_keys = mergeable_keys(base)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.merge_seconds = 0.0

    def taus(self, unit: UnitPlan) -> dict[str, torch.Tensor]:
        key = unit.merge_key()
        if key not in self._cache:
            start = time.perf_counter()
            w = unit.weights if unit.weights is not None else self.weights
            self._cache[key] = merged_task_vector(unit.method, self.base, self.children, w,
                                                  self.float_keys, **{**unit.params, "lam": 1.0})
            self.merge_seconds += time.perf_counter() - start
        return self._cache[key]

    def state(self, plan: MergePlan) -> dict[str, torch.Tensor]:
        out = {k: t.clone() for k, t in self.base.items()}
        for unit, keys in plan.assignments(self.float_keys):
            taus = self.taus(unit)
            for k in keys:
                if k in taus:
                    base_t = self.base[k]
                    out[k] = (base_t.float() + unit.lam * taus[k]).to(base_t.dtype)
        return out


# ---------------------------------------------------------------------------- controller

@dataclass(frozen=True)
class CandidateScore:
    plan: MergePlan
    per_slice: dict[str, float]

    @property
    def mean(self) -> float:
        vals = [v for v in self.per_slice.values() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def worst(self) -> float:
        vals = [v for v in self.per_slice.values() if not math.isnan(v)]
        return min(vals) if vals else float("nan")

    def to_dict(self) -> dict:
        return {"plan": self.plan.label(), "level": self.plan.level, "mean": round(self.mean, 6),
                "worst": round(self.worst, 6),
                "per_slice": {k: round(v, 6) for k, v in self.per_slice.items()}}


@dataclass
class MergeResult:
    """What a merge produced: the plan, the merged state and every candidate's held-out scores."""
    plan: MergePlan
    state: dict[str, torch.Tensor]
    score: CandidateScore | None
    candidates: list[CandidateScore]
    best_by_level: dict[str, CandidateScore]
    mode: str
    merge_seconds: float = 0.0
    search_seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return len(self.candidates)

    def to_dict(self) -> dict:
        """For the manifest: the plan (re-applicable), its score, all candidates' scores."""
        return {"mode": self.mode, "plan": self.plan.to_dict(), "plan_label": self.plan.label(),
                "score": self.score.to_dict() if self.score else None,
                "best_by_level": {lvl: c.to_dict() for lvl, c in self.best_by_level.items()},
                "candidates": [c.to_dict() for c in self.candidates],
                "evaluations": self.evaluations,
                "merge_seconds": round(self.merge_seconds, 4),
                "search_seconds": round(self.search_seconds, 4)}


def better(a: CandidateScore, b: CandidateScore | None, min_gain: float = 0.0) -> bool:
    """``a`` strictly beats ``b``: mean higher by more than ``min_gain``, or same mean, better worst."""
    if b is None:
        return True
    if math.isnan(b.mean):
        return not math.isnan(a.mean)
    if math.isnan(a.mean):
        return False
    da, dw = a.mean - b.mean, a.worst - b.worst
    if da > min_gain + 1e-12:
        return True
    return abs(da) <= 1e-12 and dw > 1e-12


class GranularityController:
    """Chooses level and method(s) per merge by held-out accuracy, or applies a pinned plan.

    ``methods``: methods searched (names, or :class:`UnitPlan` for non-default params);
    ``scales``: lambda multipliers tried per method (``lam = scale * default lam``);
    ``levels``: levels searched (model is always scored); ``group_prefixes``: layer groups by
    name prefix; ``baseline``: a model-level unit always scored first (default plain
    ``average``), so the pick never loses to it on the held-out data; ``min_gain``: the mean
    accuracy a change must add to be kept; ``pinned``: a fixed :class:`MergePlan`, or
    ``(level, UnitPlan)`` whose units are resolved at merge time (no search; scored once if an
    ``evaluate`` is given). :meth:`pin` builds the latter from settings.
    """

    def __init__(self, methods: Sequence[str | UnitPlan] = ("average", "task_arithmetic", "ties", "magmax"),
                 scales: Sequence[float] = (0.5, 1.0, 1.5),
                 levels: Sequence[str] = LEVELS,
                 group_prefixes: Mapping[str, str | Sequence[str]] | None = None,
                 baseline: UnitPlan | str | None = "average",
                 min_gain: float = 0.0,
                 pinned: MergePlan | tuple[str, UnitPlan] | None = None) -> None:
        self.methods = [m if isinstance(m, UnitPlan) else UnitPlan(m) for m in methods]
        if not self.methods and pinned is None:
            raise ValueError("the controller needs at least one method")
        self.scales = tuple(float(s) for s in scales) or (1.0,)
        bad = [lvl for lvl in levels if lvl not in LEVELS]
        if bad:
            raise ValueError(f"unknown levels {bad}; use {LEVELS}")
        self.levels = tuple(lvl for lvl in LEVELS if lvl in levels)
        self.group_prefixes = _normalise_prefixes(group_prefixes)
        self.baseline = UnitPlan(baseline) if isinstance(baseline, str) else baseline
        self.min_gain = float(min_gain)
        if isinstance(pinned, tuple) and (pinned[0] not in LEVELS or not isinstance(pinned[1], UnitPlan)):
            raise ValueError(f"pinned must be a MergePlan or (level, UnitPlan) with level in {LEVELS}")
        self.pinned = pinned

    @classmethod
    def pin(cls, level: str, method: str, group_prefixes: Mapping[str, str | Sequence[str]] | None = None,
            **params) -> "GranularityController":
        """Pinned mode from settings: ``method`` (with ``params``) for every unit of ``level``."""
        return cls(methods=(), group_prefixes=group_prefixes, pinned=(level, UnitPlan(method, params)))

    def candidate_units(self) -> list[UnitPlan]:
        out: list[UnitPlan] = []
        for m in self.methods:
            for s in self.scales:
                u = m.scaled(s) if s != 1.0 else m
                if u not in out:
                    out.append(u)
        return out

    def _model_units(self) -> list[UnitPlan]:
        units = self.candidate_units()
        if self.baseline is not None:
            units = [self.baseline] + [u for u in units if u != self.baseline]
        return units

    def evaluation_budget(self, state: StateDict | Iterable[str]) -> int:
        """The number of ``evaluate`` calls an auto merge of ``state`` (or of these floating
        keys) makes: ``M*S [+1] + (G+L)*(M*S-1)``, see the module docstring."""
        keys = mergeable_keys(state) if isinstance(state, Mapping) else list(state)
        per_unit = len(self.candidate_units()) - 1
        n = len(self._model_units())
        if "group" in self.levels:
            n += len(layer_groups(keys, self.group_prefixes)) * per_unit
        if "layer" in self.levels:
            n += len(layers(keys)) * per_unit
        return n

    def _resolve_pinned(self, keys: list[str]) -> MergePlan | None:
        if isinstance(self.pinned, tuple):
            level, unit = self.pinned
            return MergePlan.uniform(level, unit, keys, self.group_prefixes)
        return self.pinned

    def merge(self, base_state: StateDict, child_states: Sequence[StateDict],
              weights: Sequence[float] | None = None, evaluate: Evaluate | None = None) -> MergeResult:
        """Merge ``child_states`` into ``base_state`` (the version they descend from).

        ``weights``: one per child (default 1 each; see ``daemon.merge.relative_weights``);
        ``evaluate(state) -> {slice: accuracy}`` on held-out data, required in auto mode.
        """
        start = time.perf_counter()
        keys = mergeable_keys(base_state)
        candidates: list[CandidateScore] = []
        pinned = self._resolve_pinned(keys)
        if pinned is not None:
            state = apply_plan(pinned, base_state, child_states, weights)
            merge_s = time.perf_counter() - start
            chosen = None
            if evaluate is not None:
                chosen = CandidateScore(pinned, {k: float(v) for k, v in evaluate(state).items()})
                candidates.append(chosen)
            return MergeResult(pinned, state, chosen, candidates,
                               {pinned.level: chosen} if chosen else {}, "pinned", merge_s,
                               time.perf_counter() - start)
        if evaluate is None:
            raise ValueError("auto mode needs an evaluate callback (or pin a plan)")

        cache = _TaskVectorCache(base_state, child_states, weights)

        def score(plan: MergePlan) -> CandidateScore:
            result = CandidateScore(plan, {k: float(v) for k, v in evaluate(cache.state(plan)).items()})
            candidates.append(result)
            return result

        incumbent: CandidateScore | None = None
        for unit in self._model_units():
            cand = score(MergePlan("model", {MODEL_UNIT: unit}))
            if better(cand, incumbent):
                incumbent = cand
        best_by_level = {"model": incumbent}
        units = self.candidate_units()
        for level in [lvl for lvl in self.levels if lvl != "model"]:
            # the incumbent's merge at this level: identical state, so its scores carry over
            level_best = CandidateScore(incumbent.plan.at_level(level, keys, self.group_prefixes),
                                        incumbent.per_slice)
            for name in level_best.plan.unit_keys(keys):
                current = level_best.plan.units[name]
                unit_best = level_best
                for unit in units:
                    if unit != current:
                        cand = score(level_best.plan.with_unit(name, unit))
                        if better(cand, unit_best, self.min_gain):
                            unit_best = cand
                level_best = unit_best
            best_by_level[level] = level_best
            if better(level_best, incumbent, self.min_gain):
                incumbent = level_best

        return MergeResult(incumbent.plan, cache.state(incumbent.plan), incumbent, candidates,
                           best_by_level, "auto", cache.merge_seconds, time.perf_counter() - start)


def choose_plan(base_state: StateDict, child_states: Sequence[StateDict],
                weights: Sequence[float] | None, evaluate: Evaluate, **controller_kwargs) -> MergeResult:
    """Functional form: ``GranularityController(**controller_kwargs).merge(...)``."""
    return GranularityController(**controller_kwargs).merge(base_state, child_states, weights, evaluate)
