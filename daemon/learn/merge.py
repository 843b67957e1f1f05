"""Merge methods over task vectors: one small function each, one registry that names them.

A task vector is ``tau_i = theta_i - theta_base`` where base is the version the children
descend from. MagMax measures every child from the ORIGINAL base, even under sequential
fine-tuning (child t starts from the newest served weights): the caller records that base
version in the manifest. Each method maps one tensor's stacked task vectors to a merged task
vector; :func:`merge_state` applies a method to every floating tensor of a state dict (or to
``keys`` only) and adds the base back. Pure torch, no I/O.

Merge weights are relative: they are scaled to mean 1 before any method sees them (see
:func:`relative_weights`), so the engine can pass slice sizes directly and ``task_arithmetic``'s
lambda keeps its meaning (unit weights give Ilharco et al.'s plain sum). ``average``, ``ties``
and ``magmax`` do not change under a positive rescaling of the weights anyway.

Every method ends in a scalar ``lam`` (lambda): ``merged = lam * core(taus, weights)``; the
registry applies it, so a granularity plan can rescale a unit without merging again.

Methods (per tensor; ``w`` the mean-1 merge weights, ``tau_i`` stacked over children in age
order, oldest first):

- ``average``          ``lam * sum_i w_i tau_i / sum_i w_i`` (lam 1.0): MagMax's "average"
                       baseline, mergekit ``linear`` on task vectors.
- ``task_arithmetic``  ``lam * sum_i w_i tau_i`` (lam 1.0).
- ``ties``             mergekit ``ties``: per child and per tensor keep the
                       ``k = max(1, floor(density * numel))`` largest ``|tau_i|`` entries; elect
                       ``S = +1 where sum_i w_i tau_i >= 0 else -1`` over the trimmed vectors; keep
                       the entries whose sign equals ``S`` (trimmed zeros never agree); merged =
                       ``lam * sum_kept w_i tau_i / sum_kept w_i`` (0 where nothing is kept).
                       Defaults density 0.2, lam 0.55 (MagMax's TIES baseline). MagMax's own TIES
                       code trims over the whole flattened model; we trim per tensor, as mergekit
                       does, so a plan can merge any subset of tensors on its own.
- ``magmax``           per element the ``tau_i`` of largest ``|tau_i|``; ties go to the later
                       (newer) child: ``torch.where(cur.abs() >= best.abs(), cur, best)`` folded
                       in child order, as danielm1405/magmax ``merge_max_abs``; lam 0.5. Weights
                       are ignored except that a child of weight 0 takes no part.

Children whose architecture differs from the base cannot be merged by task vectors: see
:func:`compatible` and :mod:`daemon.learn.distill` (the ``distill`` method of the settings).

Sources: MagMax (Marczak et al., ECCV 2024; danielm1405/magmax src/merging/task_vectors.py,
src/merging/ties.py); mergekit (arcee-ai/mergekit merge_methods/generalized_task_arithmetic.py,
sparsify.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
# (stacked taus (n, *shape), mean-1 weights (n,), params) -> merged task vector BEFORE lam
MethodFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

# Name of the cross-architecture merge (daemon.learn.distill); not a task-vector method.
DISTILL = "distill"


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge: its core function and its default parameters (always with ``lam``)."""
    name: str
    fn: MethodFn
    defaults: dict = field(default_factory=dict)
    summary: str = ""

    def params(self, **overrides) -> dict:
        """The method's defaults with ``overrides`` applied; unknown names are an error."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        return {**self.defaults, **overrides}

    def __call__(self, stacked: torch.Tensor, weights: torch.Tensor, **params) -> torch.Tensor:
        """``lam * core(stacked, weights)`` for one tensor's stacked task vectors."""
        full = self.params(**params)
        return float(full["lam"]) * self.fn(stacked, weights.to(stacked.dtype), full)


METHODS: dict[str, MergeMethod] = {}


def register(name: str, summary: str, **defaults):
    """Decorator: add a core function to :data:`METHODS` under ``name`` with its defaults."""
    defaults.setdefault("lam", 1.0)

    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, defaults, summary)
        return fn
    return wrap


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * stacked[i]`` in one pass (a matrix-vector product, no (n, ...) temporary)."""
    return torch.tensordot(weights, stacked, dims=1)


@register("average", "weighted mean of task vectors: lam * sum w_i tau_i / sum w_i", lam=1.0)
def average(stacked, weights, params):
    return _weighted_sum(stacked, weights / weights.sum())


@register("task_arithmetic", "lam * sum_i w_i * tau_i", lam=1.0)
def task_arithmetic(stacked, weights, params):
    return _weighted_sum(stacked, weights)


def trim_top_magnitude(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Per child keep exactly ``k = max(1, floor(density * numel))`` largest-|x| entries.

    Entries tied at the k-th magnitude are kept lowest flat index first, so the result is
    deterministic. ``density >= 1`` keeps everything, ``density <= 0`` nothing.
    """
    if density >= 1.0 or stacked.numel() == 0:
        return stacked
    if density <= 0.0:
        return torch.zeros_like(stacked)
    n = stacked.shape[0]
    flat = stacked.reshape(n, -1)
    numel = flat.shape[1]
    k = max(int(density * numel), 1)
    magnitude = flat.abs()
    # the k-th largest is the (numel-k+1)-th smallest; kthvalue is O(numel), a sort is not
    kth = magnitude.kthvalue(numel - k + 1, dim=1, keepdim=True).values
    keep = magnitude >= kth
    if bool((keep.sum(1) > k).any()):
        # several entries tie at the k-th magnitude: keep only as many of them as still fit,
        # lowest index first (the cumulative count is a full extra pass, so only when needed)
        above, at = magnitude > kth, magnitude == kth
        room = k - above.sum(1, keepdim=True)
        keep = above | (at & (at.cumsum(1) <= room))
    return (flat * keep).reshape(stacked.shape)


@register("ties", "trim to top density by magnitude, elect sign by weighted mass, disjoint mean",
          density=0.2, lam=0.55)
def ties(stacked, weights, params):
    trimmed = trim_top_magnitude(stacked, float(params["density"]))
    w = weights.view(-1, *([1] * (trimmed.dim() - 1)))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(weighted) == elected                    # trimmed zeros never agree
    kept_weight = (w * agree).sum(0)
    kept_sum = (weighted * agree).sum(0)
    # where nothing is kept both sums are 0: divide by 1 there, giving 0
    return kept_sum / torch.where(kept_weight > 0, kept_weight, torch.ones_like(kept_weight))


@register("magmax", "per element the tau of largest magnitude (ties -> newest child)", lam=0.5)
def magmax(stacked, weights, params):
    taking = [i for i in range(len(stacked)) if weights[i] != 0]
    best = stacked[taking[0]]
    for i in taking[1:]:
        current = stacked[i]
        best = torch.where(current.abs() >= best.abs(), current, best)
    return best


# ---------------------------------------------------------------------------- state dicts

def task_vector(child: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """``child - base`` (float32) for every floating tensor of the base."""
    return {k: child[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


def stacked_task_vectors(base_tensor: torch.Tensor, child_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n, *shape)`` float32 task vectors of one tensor: one allocation, subtracted in place."""
    stacked = torch.stack([t.float() for t in child_tensors])
    return stacked.sub_(base_tensor.float())


def relative_weights(values: Sequence[float]) -> torch.Tensor:
    """Merge weights scaled to mean 1 (e.g. slice sizes ``[800, 400] -> [1.33, 0.67]``)."""
    w = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if len(w) == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"merge weights must be finite and non-negative with a positive sum, got {w.tolist()}")
    return w * (len(w) / w.sum())


def compatible(base: StateDict, child: StateDict) -> bool:
    """Whether ``child`` can be merged into ``base`` by task vectors (same keys and shapes).

    When False, use :func:`daemon.learn.distill.distill_into` (method ``distill``).
    """
    return set(base) == set(child) and all(base[k].shape == child[k].shape for k in base)


def check_children(base: StateDict, children: Sequence[StateDict]) -> None:
    if not children:
        raise ValueError("a merge needs at least one child")
    for i, child in enumerate(children):
        if not compatible(base, child):
            raise ValueError(f"child {i} does not have the base's keys and shapes: "
                             "merge it with daemon.learn.distill instead")


def merge_weights(weights: Sequence[float] | None, n_children: int) -> torch.Tensor:
    """Validated mean-1 weights, one per child (default: equal)."""
    if weights is None:
        return torch.ones(n_children)
    if len(weights) != n_children:
        raise ValueError(f"{n_children} children but {len(weights)} weights")
    return relative_weights(weights)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``, or a ValueError that lists the known ones."""
    if name == DISTILL:
        raise ValueError("'distill' merges children of another architecture: use daemon.learn.distill")
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)} or {DISTILL!r}")
    return METHODS[name]


def merged_task_vector(name: str, base: StateDict, children: Sequence[StateDict],
                       weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                       **params) -> dict[str, torch.Tensor]:
    """``lam * method(tau_1..tau_n)`` (float32, base NOT added) for the floating ``keys``."""
    fn = get_method(name)
    fn.params(**params)                                    # unknown parameters fail before any work
    check_children(base, children)
    w = merge_weights(weights, len(children))
    names = list(keys) if keys is not None else list(base)
    unknown = [k for k in names if k not in base]
    if unknown:
        raise KeyError(f"keys not in the base state: {unknown}")
    return {k: fn(stacked_task_vectors(base[k], [c[k] for c in children]), w, **params)
            for k in names if base[k].is_floating_point()}


def merge_state(name: str, base: StateDict, children: Sequence[StateDict],
                weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                **params) -> dict[str, torch.Tensor]:
    """``base + method(tau_1..tau_n)`` for every floating tensor (or only ``keys``).

    Tensors not merged (integer buffers, keys outside ``keys``) are copied from the base.
    ``weights``: one per child, relative (default equal); ``params`` override the method's
    defaults (``METHODS[name].defaults``), e.g. ``lam=0.5`` or ``density=0.1``.
    """
    taus = merged_task_vector(name, base, children, weights, keys, **params)
    return {k: (t.float() + taus[k]).to(t.dtype) if k in taus else t.clone() for k, t in base.items()}
