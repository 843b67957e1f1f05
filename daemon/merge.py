"""Merge methods over task vectors: one small function each, one registry that names them.

A task vector is ``tau_i = theta_i - theta_base`` where base is the version the children
descend from (MagMax measures every child from the ORIGINAL base, even under sequential
fine-tuning). Each method maps ``(taus, weights, params) -> merged task vector`` for one tensor;
:func:`merge_state` applies a method to every tensor of a state dict and adds the base back.

Sources: MagMax (Marczak et al., ECCV 2024, danielm1405/magmax); mergekit's
``task_arithmetic``, ``ties`` and ``linear`` (arcee-ai/mergekit, merge_methods/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
MethodFn = Callable[[Sequence[torch.Tensor], torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    defaults: dict = field(default_factory=dict)
    summary: str = ""

    def __call__(self, taus: Sequence[torch.Tensor], weights: torch.Tensor, **params) -> torch.Tensor:
        return self.fn(taus, weights, {**self.defaults, **params})


METHODS: dict[str, MergeMethod] = {}


def register(name: str, summary: str, **defaults):
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, defaults, summary)
        return fn
    return wrap


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    if total <= 0:
        raise ValueError("merge weights must sum to a positive number")
    return weights / total


def _shape_like(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *([1] * t.dim()))


@register("average", "weighted mean of task vectors (weights normalised to sum 1)")
def average(taus, weights, params):
    stacked = torch.stack(list(taus))
    w = _normalised(weights).to(stacked.dtype)
    return (stacked * _shape_like(w, stacked[0])).sum(0)


@register("task_arithmetic", "lambda * sum_i w_i * tau_i (weights as given)", lam=1.0)
def task_arithmetic(taus, weights, params):
    stacked = torch.stack(list(taus))
    w = weights.to(stacked.dtype)
    return params["lam"] * (stacked * _shape_like(w, stacked[0])).sum(0)


@register("ties", "trim to top density by magnitude, elect sign by mass, disjoint mean",
          density=0.2, lam=0.55)
def ties(taus, weights, params):
    stacked = torch.stack(list(taus))
    density = float(params["density"])
    if density < 1.0:
        flat = stacked.reshape(len(stacked), -1).abs()
        k = max(int(round(density * flat.shape[1])), 1)
        # k-th largest magnitude per task vector; keep entries at or above it
        threshold = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values
        stacked = stacked * (stacked.abs() >= _shape_like(threshold, stacked[0]))
    w = _shape_like(weights.to(stacked.dtype), stacked[0])
    weighted = stacked * w
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    kept_weight = (agree * w).sum(0)
    merged = (weighted * agree).sum(0) / kept_weight.clamp_min(1e-12)
    return params["lam"] * torch.where(kept_weight > 0, merged, torch.zeros_like(merged))


@register("magmax", "per element the tau of largest magnitude (ties -> newest child)", lam=0.5)
def magmax(taus, weights, params):
    stacked = torch.stack(list(taus))
    # flip so argmax's first-index tie rule picks the newest (last) child
    flipped = stacked.flip(0)
    pick = flipped.abs().argmax(0, keepdim=True)
    return params["lam"] * flipped.gather(0, pick).squeeze(0)


def task_vector(child: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    return {k: child[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


def merge_state(method: str, base: StateDict, children: Sequence[StateDict],
                weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                **params) -> dict[str, torch.Tensor]:
    """``base + method(tau_1..tau_n)`` for every floating tensor (or only ``keys``).

    Tensors not merged (integer buffers, keys outside ``keys``) are copied from the base.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    if not children:
        raise ValueError("merge_state needs at least one child")
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(children), dtype=torch.float32)
    if len(w) != len(children):
        raise ValueError(f"{len(children)} children but {len(w)} weights")
    chosen = set(keys) if keys is not None else None
    merged: dict[str, torch.Tensor] = {}
    for name, base_t in base.items():
        if not base_t.is_floating_point() or (chosen is not None and name not in chosen):
            merged[name] = base_t.clone()
            continue
        taus = [c[name].float() - base_t.float() for c in children]
        merged[name] = (base_t.float() + METHODS[method](taus, w, **params)).to(base_t.dtype)
    return merged
