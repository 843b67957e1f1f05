"""How the zoo's members are weighed for one request batch, and combined: pure functions over
tensors (no I/O, no state), one small unit per mode in one registry (:data:`MODES`), as mergekit
names its merge methods.

Evidence, per row (seed 003's "input analysis" and "similarity metric"):

1. **Distance to each slice.** Every member carries a fingerprint per slice it learned, in its OWN
   penultimate features (:class:`daemon.learn.fingerprint.Fingerprint`). ``row_distance`` is a
   chi-square per degree of freedom: about 1 for a row like the slice's reference, whatever the
   feature space, so members of different architectures compare. A slice's distance ``d_s`` is the
   mean over the members that fingerprinted it (a product of the members' Gaussian likelihoods;
   measured against the min, max and median over members, it identified the slice as well or better).
2. **Slice posterior.** ``p(s|x) = softmax_s(-sharpness/2 * d_s)``: a Gaussian likelihood per slice
   whose exponent is the chi-square, with ``sharpness`` standing in for the degrees of freedom.
3. **Expected accuracy** of member ``m`` on the row: ``sum_s p(s|x) * acc_m[s]``, ``acc_m`` its
   held-out accuracy per slice from the manifest. A slice a member has no figure for counts 0
   there: no evidence, no credit (so a zoo of children never outvotes the served model on slices
   only the served model was measured on).

Modes (``members[0]`` is always the served model; weights are ``(n, len(members))``):

- ``served``    the served model alone; the zoo is not run.
- ``route``     per row, the member of highest expected accuracy (ties: the served model).
- ``blend``     per row, ``softmax(expected accuracy / temperature)`` over members; the output is
                the weighted mixture of the members' class probabilities.
- ``layerwise`` the members of the served model's architecture MERGED in weight space (one
                forward pass of merged weights, not a blend of outputs): per row the blend
                weights over those members; rows are grouped by their dominant member and each
                group gets its own merge, unit by unit. Units are those of
                :mod:`daemon.learn.merging.plans` at the served version's merge level (what the
                training-time granularity controller chose, from its manifest; ``group`` when it
                has none) or the level asked for. Per unit, softmax(group's mean expected accuracy
                / T_u), T_u going geometrically from ``temperature * depth_spread`` at the first
                unit to ``temperature`` at the last (``depth_spread = 1``: every unit the same
                weights, so every level the same merge).

Defaults, as measured (a sweep reported with issue 12; not a shipped benchmark): MNIST-5k, default
CNN, three slices of 1,500 rows (permuted with and without replay, rotated 0/30/60), a served model merged from
two children and the zoo {bootstrap model, children}; accuracy on the mixed test rows. The slice is
identified from unlabelled rows 85% / 93% / 68% of the time (identical for every sharpness: the
argmax does not move). Sharpness 16 / 32 / 64 changes route by at most 0.7 points (16 best or
within 0.2 on two streams of three). Blend: temperature 0.02-0.05 best on two streams, 0.1 on one,
within 1.1 points. Served vs best adaptive: 74.4 vs 78.2, 53.2 vs 79.6, 87.7 vs 91.3. Layerwise
with depth spread 4 (shallow units blended, the head sharp) lost 1-9 points to spread 1; spread
0.25 (shallow units following the dominant member more closely than the head) was within
-0.1/+0.9 of spread 1, hence 0.25.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.merging.plans import LEVELS, MergePlan, UnitPlan, mergeable_keys, normalise_prefixes
from daemon.learn.models import FAMILIES, build_model
from daemon.learn.training import autocast
from daemon.serve.members import Member

AUTO_LEVEL = "auto"


@dataclass(frozen=True)
class WeightingParams:
    temperature: float = 0.05      # blend/layerwise: on expected accuracy (a 0.05 lead ~ e times the weight)
    sharpness: float = 16.0        # slice posterior: -sharpness/2 * distance (measured; docstring)
    level: str = AUTO_LEVEL        # layerwise: "model" | "group" | "layer" | "auto" (the served version's)
    depth_spread: float = 0.25     # layerwise: first unit's temperature / last unit's (measured; docstring)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.sharpness <= 0 or self.depth_spread <= 0:
            raise ValueError("temperature and sharpness must be > 0, depth_spread > 0")
        if self.level not in (*LEVELS, AUTO_LEVEL):
            raise ValueError(f"level must be one of {(*LEVELS, AUTO_LEVEL)}, got {self.level!r}")


@dataclass(frozen=True)
class Combined:
    """A mode's answer: class probabilities (n, C), and the weights (n, M) of ``members``."""
    probabilities: torch.Tensor
    weights: torch.Tensor
    members: tuple[Member, ...]


# ---------------------------------------------------------------------------------- evidence

def features_and_logits(members: Sequence[Member], x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each member's penultimate features and logits on ``x`` (model input), one pass each, float32 on CPU."""
    feats, logits = [], []
    for m in members:
        xd = x.to(m.device)
        with autocast(m.device):
            f = m.model.features(xd)
            out = m.model.head(f)
        feats.append(f.float().cpu())
        logits.append(out.float().cpu())
    return feats, logits


def slice_distances(members: Sequence[Member], feats: Sequence[torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
    """Slices fingerprinted by any member, and per row the mean distance to each (n, S)."""
    per_slice: dict[str, list[torch.Tensor]] = {}
    for m, f in zip(members, feats):
        for s, fp in m.fingerprints.items():
            per_slice.setdefault(s, []).append(fp.row_distance(f))
    slices = tuple(per_slice)
    n = feats[0].shape[0] if feats else 0
    if not slices:
        return (), torch.zeros(n, 0)
    return slices, torch.stack([torch.stack(ds).mean(0) for ds in per_slice.values()], 1)


def slice_posterior(distances: torch.Tensor, sharpness: float) -> torch.Tensor:
    """p(s|x) (n, S) from distances (n, S)."""
    return torch.softmax(-0.5 * sharpness * distances.double(), dim=1).float()


def accuracy_table(members: Sequence[Member], slices: Sequence[str]) -> torch.Tensor:
    """(M, S) held-out accuracy per member and slice; 0 where unknown."""
    return torch.tensor([[m.metrics.get(s, 0.0) for s in slices] for m in members], dtype=torch.float32).reshape(
        len(members), len(slices))


def expected_accuracy(members: Sequence[Member], feats: Sequence[torch.Tensor], sharpness: float) -> torch.Tensor:
    """(n, M): per row, each member's held-out accuracy averaged over p(s|x)."""
    slices, d = slice_distances(members, feats)
    if not slices:
        return torch.zeros(feats[0].shape[0], len(members))
    return slice_posterior(d, sharpness) @ accuracy_table(members, slices).T


def route_weights(scores: torch.Tensor) -> torch.Tensor:
    """One-hot on each row's best score; argmax takes the first of equals, the served model."""
    return F.one_hot(scores.argmax(1), scores.shape[1]).float()


def blend_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(scores.double() / temperature, dim=1).float()


# ---------------------------------------------------------------------------------- layer-wise merging

def merge_units(served: Member, level: str, prefixes=None) -> list[list[str]]:
    """The floating tensors of the served model's state, per merge unit at ``level``, shallow first.
    Units come from :class:`daemon.learn.merging.plans.MergePlan` (the training-time merges' units)."""
    keys = mergeable_keys(served.state)
    plan = MergePlan.uniform(level, UnitPlan("average"), keys, prefixes)
    return list(plan.unit_keys(keys).values())


def unit_weights(group_scores: torch.Tensor, n_units: int, params: WeightingParams) -> torch.Tensor:
    """(U, M) weights per unit for one row group: softmax(scores / T_u), T_u falling from
    ``temperature * depth_spread`` (first unit) to ``temperature`` (last)."""
    depth = torch.linspace(0.0, 1.0, n_units) if n_units > 1 else torch.ones(1)
    temps = params.temperature * params.depth_spread ** (1.0 - depth)
    return torch.softmax(group_scores.double()[None, :] / temps.double()[:, None], dim=1).float()


def merged_state(members: Sequence[Member], units: Sequence[Sequence[str]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_m weights[u, m] * theta_m`` for every tensor of every unit u; tensors no unit covers
    (integer buffers) are the served model's (``members[0]``)."""
    out = dict(members[0].state)
    for u, keys in enumerate(units):
        w = weights[u]
        for k in keys:
            ref = members[0].state[k]
            stacked = torch.stack([m.state[k].float() for m in members])
            out[k] = torch.tensordot(w.to(stacked.device), stacked, dims=1).to(ref.dtype)
    return out


def merged_model(served: Member, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the served architecture holding ``state`` (its tensors, not copies). A new module:
    ``torch.func.functional_call`` would swap the served model's own parameters while it runs, under
    the feet of concurrent requests. A built-in family is built on the meta device (nothing initialised
    for nothing; every tensor it has is in the state); a custom factory's model is copied, since it may
    hold tensors outside its state dict."""
    if served.architecture.family in FAMILIES:
        with torch.device("meta"):
            model = build_model(served.architecture)
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model = copy.deepcopy(served.model)
        model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def layerwise_level(served: Member, params: WeightingParams) -> tuple[str, dict | None]:
    """The level (and group prefixes) to merge at: the asked one, or the served version's own merge plan's."""
    if params.level != AUTO_LEVEL:
        return params.level, None
    plan = served.merge_plan or {}
    groups = plan.get("groups")
    return plan.get("level", "group"), normalise_prefixes(groups) if groups else None


# ---------------------------------------------------------------------------------- the modes

def served_mode(members: Sequence[Member], x: torch.Tensor, params: WeightingParams) -> Combined:
    _, (logits,) = features_and_logits(members[:1], x)
    return Combined(torch.softmax(logits, 1), torch.ones(len(x), 1), tuple(members[:1]))


def route_mode(members: Sequence[Member], x: torch.Tensor, params: WeightingParams) -> Combined:
    feats, logits = features_and_logits(members, x)
    w = route_weights(expected_accuracy(members, feats, params.sharpness))
    probs = torch.stack([torch.softmax(lg, 1) for lg in logits], 1)          # (n, M, C)
    return Combined((w[:, :, None] * probs).sum(1), w, tuple(members))


def blend_mode(members: Sequence[Member], x: torch.Tensor, params: WeightingParams) -> Combined:
    feats, logits = features_and_logits(members, x)
    w = blend_weights(expected_accuracy(members, feats, params.sharpness), params.temperature)
    probs = torch.stack([torch.softmax(lg, 1) for lg in logits], 1)
    return Combined((w[:, :, None] * probs).sum(1), w, tuple(members))


def layerwise_mode(members: Sequence[Member], x: torch.Tensor, params: WeightingParams) -> Combined:
    served = members[0]
    mergeable = [i for i, m in enumerate(members) if i == 0 or m.same_shape(served)]
    group = [members[i] for i in mergeable]
    feats, _ = features_and_logits(members, x)
    scores = expected_accuracy(members, feats, params.sharpness)[:, mergeable]   # evidence from every member
    level, prefixes = layerwise_level(served, params)
    units = merge_units(served, level, prefixes)
    row_w = blend_weights(scores, params.temperature)
    probs = torch.empty(len(x), 0)
    weights = torch.zeros(len(x), len(members))
    dominant = row_w.argmax(1)
    for j in dominant.unique().tolist():
        rows = (dominant == j).nonzero().squeeze(1)
        uw = unit_weights(scores[rows].mean(0), len(units), params)            # (U, M')
        model = merged_model(served, merged_state(group, units, uw.to(served.device)))
        with torch.no_grad(), autocast(served.device):
            logits = model(x[rows].to(served.device)).float().cpu()
        if probs.shape[1] == 0:
            probs = torch.empty(len(x), logits.shape[1])
        probs[rows] = torch.softmax(logits, 1)
        weights[rows[:, None], torch.tensor(mergeable)[None, :]] = uw.mean(0)  # mean over units, reported
    return Combined(probs, weights, tuple(members))


Mode = Callable[[Sequence[Member], torch.Tensor, WeightingParams], Combined]
MODES: dict[str, Mode] = {"served": served_mode, "route": route_mode, "blend": blend_mode, "layerwise": layerwise_mode}
