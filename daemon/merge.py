"""Merge methods over task vectors: one small function each, one registry that names them.

A task vector is ``tau_i = theta_i - theta_base`` where base is the version the children
descend from (MagMax measures every child from the ORIGINAL base, even under sequential
fine-tuning: record that base version in the manifest). Each method maps one tensor's task
vectors to a merged task vector; :func:`merge_state` applies a method to every tensor of a
state dict (or to ``keys`` only) and adds the base back.

Every method ends in a scalar ``lam`` (lambda): ``merged = lam * core(taus, weights)``; the
registry applies it, so a granularity plan can rescale a unit without re-merging.

Methods (per tensor; ``w`` the merge weights, ``tau_i`` stacked over children):

- ``average``          ``lam * sum_i w_i tau_i / sum_i w_i`` (lam 1.0): MagMax's "average" baseline,
                       mergekit ``linear`` on task vectors.
- ``task_arithmetic``  ``lam * sum_i w_i tau_i`` (lam 1.0, weights used as given: pass weights with
                       mean 1, see :func:`relative_weights`, so unit weights give Ilharco's sum).
- ``ties``             mergekit ``ties``: per child and per tensor keep the ``k = floor(density*numel)``
                       (at least 1) largest ``|tau_i|`` entries; elect ``S = +1 where sum_i w_i tau_i >= 0
                       else -1``; keep entries whose sign equals ``S`` (zeros never agree); merged =
                       ``lam * sum_kept w_i tau_i / sum_kept w_i`` (0 where nothing is kept).
                       Defaults density 0.2, lam 0.55 (MagMax's TIES baseline).
- ``magmax``           per element the ``tau_i`` of largest ``|tau_i|``; ties go to the later (newer)
                       child, exactly as ``torch.where(cur.abs() >= best.abs(), cur, best)`` folded in
                       child order (danielm1405/magmax ``merge_max_abs``); lam 0.5. Weights are ignored
                       except that a child of weight 0 takes no part.

Children whose architecture differs from the base cannot be merged by task vectors: see
:func:`compatible` and :mod:`daemon.distill` (the ``distill`` method of the settings).

Sources: MagMax (Marczak et al., ECCV 2024, danielm1405/magmax src/merging/task_vectors.py);
mergekit (arcee-ai/mergekit, merge_methods/generalized_task_arithmetic.py, sparsify.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
# (stacked taus (n, *shape), weights (n,), params) -> merged task vector BEFORE lam
MethodFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

# Name of the cross-architecture merge (daemon.distill); not a task-vector method.
DISTILL = "distill"


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    defaults: dict = field(default_factory=dict)
    summary: str = ""

    def params(self, **overrides) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        return {**self.defaults, **overrides}

    def core(self, taus: Sequence[torch.Tensor] | torch.Tensor, weights: torch.Tensor,
             **params) -> torch.Tensor:
        """The merged task vector without the final ``lam`` factor."""
        stacked = taus if isinstance(taus, torch.Tensor) else torch.stack(list(taus))
        return self.fn(stacked, weights.to(stacked.dtype), self.params(**params))

    def __call__(self, taus: Sequence[torch.Tensor] | torch.Tensor, weights: torch.Tensor,
                 **params) -> torch.Tensor:
        full = self.params(**params)
        return float(full["lam"]) * self.core(taus, weights, **params)


METHODS: dict[str, MergeMethod] = {}


def register(name: str, summary: str, **defaults):
    defaults.setdefault("lam", 1.0)

    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, defaults, summary)
        return fn
    return wrap


def _per_child(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights (n,) shaped to broadcast over stacked taus (n, *shape)."""
    return w.view(-1, *([1] * (like.dim() - 1)))


@register("average", "weighted mean of task vectors: lam * sum w_i tau_i / sum w_i", lam=1.0)
def average(stacked, weights, params):
    total = weights.sum()
    if total <= 0:
        raise ValueError("average needs merge weights with a positive sum")
    return (stacked * _per_child(weights / total, stacked)).sum(0)


@register("task_arithmetic", "lam * sum_i w_i * tau_i (weights as given)", lam=1.0)
def task_arithmetic(stacked, weights, params):
    return (stacked * _per_child(weights, stacked)).sum(0)


def trim_top_magnitude(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Per child keep exactly ``k = max(1, floor(density * numel))`` largest-|x| entries.

    Entries tied at the k-th magnitude are kept lowest flat index first (a stable descending
    sort's order), so the result is deterministic. ``density >= 1`` keeps everything.
    """
    if density >= 1.0:
        return stacked
    if density <= 0.0:
        return torch.zeros_like(stacked)
    n = stacked.shape[0]
    flat = stacked.reshape(n, -1)
    numel = flat.shape[1]
    k = max(int(density * numel), 1)
    mags = flat.abs()
    # k-th largest = (numel-k+1)-th smallest; O(numel), unlike a full sort
    kth = mags.kthvalue(numel - k + 1, dim=1, keepdim=True).values
    above = mags > kth
    at = mags == kth
    room = k - above.sum(1, keepdim=True)                      # how many tied entries still fit
    keep = above | (at & (at.cumsum(1) <= room))
    return (flat * keep).reshape(stacked.shape)


@register("ties", "trim to top density by magnitude, elect sign by weighted mass, disjoint mean",
          density=0.2, lam=0.55)
def ties(stacked, weights, params):
    trimmed = trim_top_magnitude(stacked, float(params["density"]))
    w = _per_child(weights, trimmed)
    weighted = trimmed * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(weighted) == majority                    # zeros (trimmed) never agree
    kept_weight = (w * agree).sum(0)
    mixed = (weighted * agree).sum(0)
    return torch.where(kept_weight != 0, mixed / torch.where(kept_weight != 0, kept_weight, 1.0),
                       torch.zeros_like(mixed))


@register("magmax", "per element the tau of largest magnitude (ties -> newest child)", lam=0.5)
def magmax(stacked, weights, params):
    taking = [i for i in range(len(stacked)) if weights[i] != 0]
    if not taking:
        return torch.zeros_like(stacked[0])
    best = stacked[taking[0]]
    for i in taking[1:]:
        cur = stacked[i]
        best = torch.where(cur.abs() >= best.abs(), cur, best)
    return best


def task_vector(child: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    return {k: child[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


def relative_weights(values: Sequence[float]) -> list[float]:
    """Scale merge weights to mean 1 (e.g. slice sizes ``[800, 400] -> [1.33, 0.67]``).

    ``task_arithmetic`` uses weights as given; mean-1 weights keep its lambda meaningful.
    """
    total = float(sum(values))
    if total <= 0 or any(v < 0 for v in values):
        raise ValueError("weights must be non-negative with a positive sum")
    return [len(values) * float(v) / total for v in values]


def compatible(base: StateDict, child: StateDict) -> bool:
    """Whether ``child`` can be merged into ``base`` by task vectors (same keys and shapes).

    When False, use :func:`daemon.distill.distill_into` (method ``distill``).
    """
    return set(base) == set(child) and all(base[k].shape == child[k].shape for k in base)


def _check(method: str, base: StateDict, children: Sequence[StateDict],
           weights: Sequence[float] | None) -> torch.Tensor:
    if method == DISTILL:
        raise ValueError("'distill' merges children of another architecture: use daemon.distill")
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)} or {DISTILL!r}")
    if not children:
        raise ValueError("a merge needs at least one child")
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(children),
                     dtype=torch.float32)
    if len(w) != len(children):
        raise ValueError(f"{len(children)} children but {len(w)} weights")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"merge weights must be finite and non-negative, got {w.tolist()}")
    for i, child in enumerate(children):
        if not compatible(base, child):
            raise ValueError(f"child {i} does not have the base's keys and shapes: "
                             "merge it with daemon.distill instead")
    return w


def merged_task_vector(method: str, base: StateDict, children: Sequence[StateDict],
                       weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                       **params) -> dict[str, torch.Tensor]:
    """``lam * method(tau_1..tau_n)`` (float32, base NOT added) for the floating ``keys``."""
    w = _check(method, base, children, weights)
    fn = METHODS[method]
    lam = float(fn.params(**params)["lam"])
    out: dict[str, torch.Tensor] = {}
    for name in (list(keys) if keys is not None else list(base)):
        base_t = base[name]
        if not base_t.is_floating_point():
            continue
        base_f = base_t.float()
        stacked = torch.stack([c[name].float() - base_f for c in children])
        out[name] = lam * fn.core(stacked, w, **params)
    return out


def merge_keys(method: str, base: StateDict, children: Sequence[StateDict],
               weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
               **params) -> dict[str, torch.Tensor]:
    """The merged tensors ``base + method(tau_1..tau_n)`` of the floating ``keys`` only."""
    taus = merged_task_vector(method, base, children, weights, keys, **params)
    return {name: (base[name].float() + tau).to(base[name].dtype) for name, tau in taus.items()}


def merge_state(method: str, base: StateDict, children: Sequence[StateDict],
                weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                **params) -> dict[str, torch.Tensor]:
    """``base + method(tau_1..tau_n)`` for every floating tensor (or only ``keys``).

    Tensors not merged (integer buffers, keys outside ``keys``) are copied from the base.
    ``weights`` default to 1 per child; ``params`` override the method's defaults
    (``METHODS[method].defaults``), e.g. ``lam=0.5`` or ``density=0.1``.
    """
    unknown = set(keys) - set(base) if keys is not None else set()
    if unknown:
        raise KeyError(f"keys not in the base state: {sorted(unknown)}")
    merged = merge_keys(method, base, children, weights, keys, **params)
    return {name: merged[name] if name in merged else t.clone() for name, t in base.items()}
