"""Merge methods over task vectors: one small core function each, with typed parameters and the
paper and code it follows, in one registry (:data:`METHODS`), as mergekit keeps its methods.

A task vector is ``tau_i = theta_i - theta_base`` where base is the version the children
descend from. MagMax measures every child from the ORIGINAL base, even under sequential
fine-tuning (child t starts from the newest served weights): the caller records that base
version in the manifest. Each method maps one tensor's stacked task vectors to a merged task
vector; :mod:`daemon.learn.merging.plans` applies methods to a state dict and adds the base back.

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
:func:`compatible` and :mod:`daemon.learn.merging.distill` (the ``distill`` method of the settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Mapping, Sequence, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

StateDict = Mapping[str, torch.Tensor]

# Name of the cross-architecture merge (daemon.learn.merging.distill); not a task-vector method.
DISTILL = "distill"


class MethodParams(BaseModel):
    """A method's parameters, each with its default. Every method declares ``lam`` (last, so plans
    list a method's own parameters first), the scale of its merged task vector."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    # every subclass declares ``lam: float = <default>`` as its last field (register checks it);
    # not declared here, where it would come first in every plan's JSON


P = TypeVar("P", bound=MethodParams)
# (stacked taus (n, *shape), mean-1 weights (n,), params) -> merged task vector BEFORE lam
Core = Callable[[torch.Tensor, torch.Tensor, P], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod(Generic[P]):
    """A registered merge: its core function, its parameter model (with the defaults), a one-line
    summary and the reference it follows."""

    name: str
    core: Core
    params_model: type[P]
    summary: str
    reference: str

    @property
    def defaults(self) -> dict:
        return self.params_model().model_dump()

    def validate(self, **params) -> P:
        """The typed parameters: defaults with ``params`` applied; unknown names or bad values fail."""
        unknown = set(params) - set(self.params_model.model_fields)
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.params_model.model_fields)}")
        return self.params_model(**params)

    def params(self, **overrides) -> dict:
        """The method's defaults with ``overrides`` applied, as plain JSON values."""
        return self.validate(**overrides).model_dump()

    def __call__(self, stacked: torch.Tensor, weights: torch.Tensor, **params) -> torch.Tensor:
        """``lam * core(stacked, weights)`` for one tensor's stacked task vectors."""
        p = self.validate(**params)
        merged = self.core(stacked, weights.to(stacked.dtype), p)
        return merged if p.lam == 1.0 else p.lam * merged


METHODS: dict[str, MergeMethod] = {}


def register(name: str, params_model: type[P], summary: str, reference: str) -> Callable[[Core], Core]:
    """Decorator: add a core function to :data:`METHODS` under ``name``."""
    if "lam" not in params_model.model_fields or params_model.model_fields["lam"].is_required():
        raise TypeError(f"merge method {name!r}: its parameters must give lam a default")

    def wrap(fn: Core) -> Core:
        METHODS[name] = MergeMethod(name, fn, params_model, summary, reference)
        return fn
    return wrap


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * stacked[i]`` in one pass (a matrix-vector product, no (n, ...) temporary)."""
    return torch.tensordot(weights, stacked, dims=1)


class AverageParams(MethodParams):
    lam: float = 1.0


@register("average", AverageParams, "weighted mean of task vectors: lam * sum w_i tau_i / sum w_i",
          "Marczak et al., MagMax, ECCV 2024 (the 'average' baseline); mergekit merge_methods 'linear'")
def average(stacked: torch.Tensor, weights: torch.Tensor, params: AverageParams) -> torch.Tensor:
    return _weighted_sum(stacked, weights / weights.sum())


class TaskArithmeticParams(MethodParams):
    lam: float = 1.0


@register("task_arithmetic", TaskArithmeticParams, "lam * sum_i w_i * tau_i",
          "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023; mergekit "
          "merge_methods/generalized_task_arithmetic.py")
def task_arithmetic(stacked: torch.Tensor, weights: torch.Tensor, params: TaskArithmeticParams) -> torch.Tensor:
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


class TiesParams(MethodParams):
    density: float = Field(0.2, ge=0.0, le=1.0, description="share of each child's entries kept")
    lam: float = 0.55


@register("ties", TiesParams, "trim to top density by magnitude, elect sign by weighted mass, disjoint mean",
          "Yadav et al., TIES-Merging, NeurIPS 2023; mergekit sparsify.py and "
          "generalized_task_arithmetic.py; defaults from MagMax's TIES baseline (danielm1405/magmax "
          "src/merging/ties.py)")
def ties(stacked: torch.Tensor, weights: torch.Tensor, params: TiesParams) -> torch.Tensor:
    trimmed = trim_top_magnitude(stacked, params.density)
    w = weights.view(-1, *([1] * (trimmed.dim() - 1)))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(weighted) == elected                    # trimmed zeros never agree
    kept_weight = (w * agree).sum(0)
    kept_sum = (weighted * agree).sum(0)
    # where nothing is kept both sums are 0: divide by 1 there, giving 0
    return kept_sum / torch.where(kept_weight > 0, kept_weight, torch.ones_like(kept_weight))


class MagMaxParams(MethodParams):
    lam: float = 0.5


@register("magmax", MagMaxParams, "per element the tau of largest magnitude (ties -> newest child)",
          "Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024; "
          "danielm1405/magmax src/merging/task_vectors.py (merge_max_abs)")
def magmax(stacked: torch.Tensor, weights: torch.Tensor, params: MagMaxParams) -> torch.Tensor:
    taking = [i for i in range(len(stacked)) if weights[i] != 0]
    best = stacked[taking[0]]
    for i in taking[1:]:
        current = stacked[i]
        best = torch.where(current.abs() >= best.abs(), current, best)
    return best


# ---------------------------------------------------------------------------- inputs

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


def merge_weights(weights: Sequence[float] | None, n_children: int) -> torch.Tensor:
    """Validated mean-1 weights, one per child (default: equal)."""
    if weights is None:
        return torch.ones(n_children)
    if len(weights) != n_children:
        raise ValueError(f"{n_children} children but {len(weights)} weights")
    return relative_weights(weights)


def compatible(base: StateDict, child: StateDict) -> bool:
    """Whether ``child`` can be merged into ``base`` by task vectors (same keys and shapes).

    When False, use :func:`daemon.learn.merging.distill.distill_into` (method ``distill``).
    """
    return set(base) == set(child) and all(base[k].shape == child[k].shape for k in base)


def check_children(base: StateDict, children: Sequence[StateDict]) -> None:
    if not children:
        raise ValueError("a merge needs at least one child")
    for i, child in enumerate(children):
        if not compatible(base, child):
            raise ValueError(f"child {i} does not have the base's keys and shapes: "
                             "merge it with daemon.learn.merging.distill instead")


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``, or a ValueError that lists the known ones."""
    if name == DISTILL:
        raise ValueError("'distill' merges children of another architecture: use daemon.learn.merging.distill")
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)} or {DISTILL!r}")
    return METHODS[name]
