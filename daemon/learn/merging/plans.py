"""Merge plans: which method, with which parameters, merges which tensors. Pure torch, no I/O.

A :class:`MergePlan` merges a model as one unit (level ``"model"``), per layer group (``"group"``:
groups by parameter-name prefix, default ``features`` = ``stages.*`` and ``head`` = ``head.*``,
the two halves every model family has, see :mod:`daemon.learn.models`) or per layer (``"layer"``:
one unit per module, i.e. a parameter name minus its last component). Each unit names a method of
:data:`daemon.learn.merging.methods.METHODS` and its parameters (``lam`` and the method's own,
defaults filled in). Plans are JSON (:meth:`MergePlan.to_dict` / :meth:`MergePlan.from_dict`) for
the manifest and the settings; :func:`apply_plan` turns a plan, a base and children into a state.

:class:`MergedTaskVectors` is the one merge path: it merges each (method, parameters other than
lam, tensor) once and caches it, so a search can assemble many plans over the same children
cheaply (one pass over the parameters per plan).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from daemon.learn.merging.methods import StateDict, check_children, get_method, merge_weights, stacked_task_vectors

LEVELS = ("model", "group", "layer")
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"features": ("stages.",), "head": ("head.",)}
OTHER_GROUP = "other"
MODEL_UNIT = "model"

Prefixes = Mapping[str, "str | Sequence[str]"]

# ---------------------------------------------------------------------------- units

def normalise_prefixes(prefixes: Prefixes | None) -> dict[str, tuple[str, ...]]:
    source = DEFAULT_GROUPS if prefixes is None else prefixes
    return {name: (p,) if isinstance(p, str) else tuple(p) for name, p in source.items()}


def layer_groups(state_keys: Iterable[str], prefixes: Prefixes | None = None) -> dict[str, list[str]]:
    """Group name -> keys, by name prefix (the first group with a matching prefix wins).

    Default groups: ``features`` (``stages.``) and ``head`` (``head.``). Keys matching no prefix
    go to ``other``. Empty groups are left out.
    """
    groups = normalise_prefixes(prefixes)
    out: dict[str, list[str]] = {name: [] for name in groups}
    out.setdefault(OTHER_GROUP, [])
    for key in state_keys:
        owner = next((name for name, pres in groups.items() if key.startswith(pres)), OTHER_GROUP)
        out[owner].append(key)
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


def mergeable_keys(state: StateDict) -> list[str]:
    """The keys a plan covers: floating tensors (integer buffers are copied from the base)."""
    return [k for k, t in state.items() if t.is_floating_point()]


# ---------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class UnitPlan:
    """What one unit gets: a method and its full parameters (defaults filled in)."""
    method: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # fill in the defaults so that equal merges compare (and cache) equal
        object.__setattr__(self, "params", get_method(self.method).params(**self.params))

    def __hash__(self) -> int:                     # params is a dict: hash its sorted items
        return hash((self.method, tuple(sorted(self.params.items()))))

    @property
    def lam(self) -> float:
        return float(self.params["lam"])

    def merge_key(self) -> tuple:
        """Everything but lam: units sharing it share one merged task vector."""
        return self.method, tuple(sorted((k, v) for k, v in self.params.items() if k != "lam"))

    def scaled(self, scale: float) -> "UnitPlan":
        return UnitPlan(self.method, {**self.params, "lam": round(self.lam * scale, 10)})

    def label(self) -> str:
        args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({args})"

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "UnitPlan":
        return cls(d["method"], dict(d.get("params", {})))


@dataclass(frozen=True)
class MergePlan:
    """A level and, per unit at that level, the :class:`UnitPlan` that merges it.

    ``groups`` (group level) are the name prefixes the units were built from, so the plan can
    be applied to any state dict of the family.
    """
    level: str
    units: dict[str, UnitPlan]
    groups: dict[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"plan level must be one of {LEVELS}, got {self.level!r}")
        if self.level == "model" and set(self.units) != {MODEL_UNIT}:
            raise ValueError(f"a model-level plan has exactly one unit named {MODEL_UNIT!r}")

    @classmethod
    def uniform(cls, level: str, unit: UnitPlan, state_keys: Iterable[str],
                prefixes: Prefixes | None = None) -> "MergePlan":
        """The same method for every unit of ``level``."""
        keys = list(state_keys)
        if level == "group":
            groups = normalise_prefixes(prefixes)
            return cls("group", {g: unit for g in layer_groups(keys, groups)}, groups)
        if level == "layer":
            return cls("layer", {name: unit for name in layers(keys)})
        return cls(level, {MODEL_UNIT: unit})

    def unit_keys(self, state_keys: Iterable[str]) -> dict[str, list[str]]:
        """Unit name -> the keys of ``state_keys`` it merges."""
        keys = list(state_keys)
        if self.level == "group":
            return layer_groups(keys, self.groups)
        if self.level == "layer":
            return layers(keys)
        return {MODEL_UNIT: keys}

    def assignments(self, state_keys: Iterable[str]) -> list[tuple[UnitPlan, list[str]]]:
        out = []
        for name, keys in self.unit_keys(state_keys).items():
            if name not in self.units:
                raise KeyError(f"{self.level}-level plan has no unit {name!r} (keys {keys[:3]}...)")
            out.append((self.units[name], keys))
        return out

    def with_unit(self, name: str, unit: UnitPlan) -> "MergePlan":
        return MergePlan(self.level, {**self.units, name: unit}, self.groups)

    def at_level(self, level: str, state_keys: Iterable[str], prefixes: Prefixes | None = None) -> "MergePlan":
        """The same merge expressed at a finer level (each new unit inherits its old unit's plan).

        ``prefixes`` name the groups when refining a model-level plan to groups.
        """
        if level == self.level:
            return self
        if level not in LEVELS or LEVELS.index(level) < LEVELS.index(self.level):
            raise ValueError(f"cannot turn a {self.level}-level plan into a {level!r}-level one")
        keys = list(state_keys)
        owner = {k: unit for unit, ks in self.assignments(keys) for k in ks}
        finer = MergePlan.uniform(level, UnitPlan("average"), keys, self.groups or prefixes)
        units = {}
        for name, ks in finer.unit_keys(keys).items():
            if len({owner[k] for k in ks}) != 1:
                raise ValueError(f"unit {name!r} spans keys with different plans")
            units[name] = owner[ks[0]]
        return MergePlan(level, units, finer.groups)

    def label(self) -> str:
        distinct = {u.label() for u in self.units.values()}
        if len(distinct) == 1:
            return f"{self.level}:{distinct.pop()}"
        return f"{self.level}:" + ";".join(f"{n}={u.label()}" for n, u in self.units.items())

    def to_dict(self) -> dict:
        d: dict = {"level": self.level, "units": {n: u.to_dict() for n, u in self.units.items()}}
        if self.groups is not None:
            d["groups"] = {g: list(p) for g, p in self.groups.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MergePlan":
        groups = d.get("groups")
        return cls(d["level"], {n: UnitPlan.from_dict(u) for n, u in d["units"].items()},
                   {g: tuple(p) for g, p in groups.items()} if groups is not None else None)


class MergedTaskVectors:
    """Per (unit's method and parameters other than lam, tensor): the merged task vector, computed
    on first use. :meth:`state` turns any plan over these children into a state dict cheaply."""

    def __init__(self, base: StateDict, children: Sequence[StateDict], weights: Sequence[float] | None) -> None:
        check_children(base, children)
        self.base, self.children = base, children
        self.weights = merge_weights(weights, len(children))
        self.keys = mergeable_keys(base)
        self._cache: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0                                   # time spent merging (not assembling)

    def get(self, unit: UnitPlan, key: str) -> torch.Tensor:
        """``core(tau_1..tau_n)`` of one tensor, WITHOUT lam."""
        cache_key = (unit.merge_key(), key)
        if cache_key not in self._cache:
            start = time.perf_counter()
            stacked = stacked_task_vectors(self.base[key], [c[key] for c in self.children])
            self._cache[cache_key] = get_method(unit.method)(stacked, self.weights, **{**unit.params, "lam": 1.0})
            self.seconds += time.perf_counter() - start
        return self._cache[cache_key]

    def state(self, plan: MergePlan) -> dict[str, torch.Tensor]:
        """``base + lam * core`` for every floating tensor, per its unit's plan; integer buffers
        (which no unit merges) are cloned from the base."""
        merged = {k: (self.base[k].float() + unit.lam * self.get(unit, k)).to(self.base[k].dtype)
                  for unit, keys in plan.assignments(self.keys) for k in keys}
        return {k: merged[k] if k in merged else t.clone() for k, t in self.base.items()}


def apply_plan(plan: MergePlan, base_state: StateDict, child_states: Sequence[StateDict],
               weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Merge every unit of ``plan`` with its own method; integer buffers are copied from the base."""
    return MergedTaskVectors(base_state, child_states, weights).state(plan)
