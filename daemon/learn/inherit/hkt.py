"""Hereditary Knowledge Transfer (HKT) as a loss for :func:`daemon.learn.training.fit`.

Tchenko et al. 2025 (arXiv 2508.09743); the formulas follow the authors' runnable code
(christian-tchenko/LePoKet, ``gen_attention.py`` and ``trainer.py``). Three steps, Extraction →
Transfer → Mixture (ETM):

- **Extraction**: which parent stage outputs the child inherits (``stages``, indices into
  ``model.stages``; default :data:`DEFAULT_STAGES`, or a user model's ``hkt_stages``).
- **Transfer**: align each extracted parent output to the child's shape at the same stage
  (:class:`Align`: 1x1 conv for ``(N, C, H, W)`` maps, ``Linear`` for ``(N, C)`` embeddings and
  for the channel axis of ``(N, T, C)`` sequences, adaptive pooling / interpolation where spatial
  or temporal sizes differ). The reverse direction aligns the child's output to the parent's.
- **Mixture by Genetic Attention** (:func:`genetic_attention`): with ``q`` the child's feature and
  ``P`` the aligned parent feature, ``s = sigmoid(<q, P> / sqrt(C))`` per sample (per position for
  maps), ``GA = s*P + (1-s)*q``, ``z = q + alpha*(P - GA)``, ``alpha = 0.6``.

Loss (one step): ``CE(child(x)) + CE(child head on the forward mix) + CE(parent head on the
reverse mix)``. The forward mix runs the child's stream with ``z`` substituted at every extracted
stage; the reverse mix runs the parent's remaining stages and head on ``z`` built with the child's
(up-projected) feature as ``q`` and the parent's as ``P`` (as in the authors' code, where the
"head" call mixes ``q = child, P = parent`` and feeds the parent's classifier). Only the child and
the alignment modules are optimised; the parent is frozen for the fit (no grads, eval mode) and
restored as it was. The alignment modules live in the loss, built fresh by each fit, never in the
child: the trained child runs alone. Pure torch, no I/O::

    fit(child, x, y, loss=HKTLoss(parent), epochs=2, lr=1e-3, generator=g)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import Loss, Terms, frozen

# Extraction default for every family (indices into ``model.stages``; negative counts from the end).
# The penultimate embedding, where the authors mix (their GA acts on the pooled (N, C) feature);
# `filial bench hkt` with ``hkt:stages=all`` measured no consistent gain from mixing every stage.
# A user model may name its own with an ``hkt_stages`` attribute.
DEFAULT_STAGES: tuple[int, ...] = (-1,)
ALPHA = 0.6   # z = q + alpha * (P - GA), the authors' value


# ---------------------------------------------------------------------------------------------
# Mixture by Genetic Attention


def channel_dim(t: torch.Tensor) -> int:
    """Channel axis by convention: ``(N, C)`` → 1, ``(N, C, H, W)`` → 1, ``(N, T, C)`` → -1."""
    if t.dim() == 3:
        return -1
    if t.dim() in (2, 4, 5):
        return 1
    raise ValueError(f"cannot mix a tensor of shape {tuple(t.shape)}: expected (N,C), (N,T,C) or (N,C,H,W)")


def genetic_attention(q: torch.Tensor, p: torch.Tensor, alpha: float | torch.Tensor = ALPHA
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Genetic Attention mix of a child feature ``q`` with an aligned parent feature ``p``.

    Returns ``(z, s, ga)``: ``s = sigmoid(<q, p> / sqrt(C))`` over the channel axis (one value per
    sample for ``(N, C)``, per position for maps and sequences, kept as a size-1 axis),
    ``ga = s*p + (1-s)*q`` and ``z = q + alpha*(p - ga)``. ``alpha`` may be a tensor broadcastable
    to ``q``.
    """
    if q.shape != p.shape:
        raise ValueError(f"genetic attention needs equal shapes, got {tuple(q.shape)} and {tuple(p.shape)}")
    dim = channel_dim(q)
    channels = q.shape[dim]
    s = torch.sigmoid((q * p).sum(dim=dim, keepdim=True) / math.sqrt(channels))
    ga = s * p + (1 - s) * q
    z = q + alpha * (p - ga)
    return z, s, ga


# ---------------------------------------------------------------------------------------------
# Transfer: alignment of one stage output to another model's shape at the same stage


def channels_and_size(shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(channels, spatial/temporal size) of a per-sample shape under :func:`channel_dim`."""
    if len(shape) == 1:
        return shape[0], ()
    if len(shape) == 2:   # (T, C)
        return shape[1], (shape[0],)
    if len(shape) == 3:   # (C, H, W)
        return shape[0], (shape[1], shape[2])
    raise ValueError(f"cannot align a stage output of per-sample shape {tuple(shape)}")


class Align(nn.Module):
    """Maps a stage output of per-sample shape ``src`` to ``dst``: channel projection (1x1 conv or
    Linear), then adaptive pooling (shrink) or interpolation (grow) of the spatial/temporal size.
    A map feeding an embedding is pooled globally first."""

    def __init__(self, src: Sequence[int], dst: Sequence[int]) -> None:
        super().__init__()
        self.src, self.dst = tuple(src), tuple(dst)
        c_src, size_src = channels_and_size(self.src)
        c_dst, size_dst = channels_and_size(self.dst)
        if size_dst and len(size_src) != len(size_dst):
            raise ValueError(f"cannot align a stage output {self.src} to {self.dst}: ranks differ")
        self.pool_global = len(size_dst) == 0 and len(size_src) > 0
        self.size = size_dst if size_dst != size_src else None
        if len(self.src) == 3 and not self.pool_global:
            self.proj = nn.Conv2d(c_src, c_dst, kernel_size=1)
        else:
            self.proj = nn.Linear(c_src, c_dst)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.pool_global:
            h = h.mean(dim=tuple(range(2, h.dim()))) if h.dim() == 4 else h.mean(dim=1)
            return self.proj(h)
        h = self.proj(h)
        if self.size is None:
            return h
        if h.dim() == 4:
            if all(d <= s for d, s in zip(self.size, h.shape[2:])):
                return F.adaptive_avg_pool2d(h, self.size)
            return F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        # (N, T, C): resize along T
        t = h.transpose(1, 2)
        t = F.adaptive_avg_pool1d(t, self.size[0]) if self.size[0] <= t.shape[-1] else \
            F.interpolate(t, size=self.size[0], mode="linear", align_corners=False)
        return t.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Model access (built-in families and user models exposing stages/head)


def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(model, "stage_outputs"):
        return list(model.stage_outputs(x))
    prepare = getattr(model, "prepare", None)
    h, outs = (prepare(x) if callable(prepare) else x), []
    for stage in model.stages:
        h = stage(h)
        outs.append(h)
    return outs


def resolve_stages(parent: nn.Module, child: nn.Module, stages: Sequence[int] | None) -> tuple[int, ...]:
    """Stage indices (non-negative, sorted) valid in both models; they must have as many stages."""
    n_parent, n_child = len(parent.stages), len(child.stages)
    if n_parent != n_child:
        raise ValueError(f"HKT pairs stages by index: the parent has {n_parent} stages, the child {n_child}")
    chosen = getattr(parent, "hkt_stages", DEFAULT_STAGES) if stages is None else tuple(stages)
    resolved = set()
    for i in chosen:
        j = i + n_parent if i < 0 else i
        if not 0 <= j < n_parent:
            raise ValueError(f"HKT stage {i} out of range for a model with {n_parent} stages")
        resolved.add(j)
    return tuple(sorted(resolved))


# ---------------------------------------------------------------------------------------------
# The loss


class HKTLoss(Loss):
    """The three HKT terms from a frozen ``parent`` (held outside the child's module tree).

    ``stages`` (None → the parent's ``hkt_stages`` or :data:`DEFAULT_STAGES`) and ``alpha`` as in
    the module docstring. The alignment modules (``down``: parent → child shape, ``up``: child →
    parent shape, one per extracted stage) are built by :meth:`bind` from two probe rows and
    trained with the child.
    """

    reverse = True   # include the reverse-mix term (parent head)

    def __init__(self, parent: nn.Module, *, stages: Sequence[int] | None = None, alpha: float = ALPHA) -> None:
        if stages is not None and len(stages) == 0:
            raise ValueError("HKT stages must name at least one stage (or be None for the default)")
        self.parent = parent
        self.wanted = None if stages is None else tuple(stages)
        self.alpha = alpha
        self.stages: tuple[int, ...] = ()                     # resolved, and the rest built, by bind
        self.shapes: tuple[list, list] = ([], [])               # per-sample stage output shapes: parent, child
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()

    @contextmanager
    def bind(self, model: nn.Module, x: torch.Tensor) -> Iterator[list]:
        """Freeze the parent for the fit; build fresh alignment modules on the child's device."""
        child = model
        with frozen(self.parent) as parent:
            self.stages = resolve_stages(parent, child, self.wanted)
            was_training = child.training
            child.eval()
            with torch.no_grad():
                p_shapes = [tuple(t.shape[1:]) for t in stage_outputs(parent, x[:2])]
                c_shapes = [tuple(t.shape[1:]) for t in stage_outputs(child, x[:2])]
            child.train(was_training)
            self.shapes = p_shapes, c_shapes
            device = next(child.parameters()).device
            self.down = nn.ModuleDict({str(k): Align(p_shapes[k], c_shapes[k]) for k in self.stages}).to(device)
            self.up = nn.ModuleDict({str(k): Align(c_shapes[k], p_shapes[k]) for k in self.stages}
                                    if self.reverse else {}).to(device)
            yield [*self.down.parameters(), *self.up.parameters()]

    def alpha_at(self, direction: str, stage: int) -> float | torch.Tensor:
        """The mixing weight at ``stage`` for ``direction`` ("fwd" or "rev")."""
        return self.alpha

    def terms(self, child: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        """``child``, ``mix`` and (with :attr:`reverse`) ``reverse`` cross-entropies for one batch."""
        parent, ks = self.parent, self.stages
        with torch.no_grad():
            p_outs = stage_outputs(parent, x)
        c_outs = stage_outputs(child, x)
        out = {"child": F.cross_entropy(child.head(c_outs[-1]), y)}
        first = ks[0]
        # forward mix: child stream with z substituted at each extracted stage, child head
        h = None
        for i in range(first, len(child.stages)):
            h = c_outs[i] if i == first else child.stages[i](h)
            if i in ks:
                h, _, _ = genetic_attention(h, self.down[str(i)](p_outs[i]), self.alpha_at("fwd", i))
        out["mix"] = F.cross_entropy(child.head(h), y)
        if self.reverse:
            # reverse mix: q = child's output lifted to the parent's shape, P = parent stream; parent head
            h = None
            for i in range(first, len(parent.stages)):
                h = p_outs[i] if i == first else parent.stages[i](h)
                if i in ks:
                    h, _, _ = genetic_attention(self.up[str(i)](c_outs[i]), h, self.alpha_at("rev", i))
            out["reverse"] = F.cross_entropy(parent.head(h), y)
        return out

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        out = self.terms(model, x, y)
        out["total"] = out["child"] + out["mix"] + out["reverse"]
        return out
