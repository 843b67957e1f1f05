"""Hereditary Knowledge Transfer (HKT): a child inherits from its parent's feature blocks.

Tchenko et al. 2025 (arXiv 2508.09743); the formulas follow the authors' runnable code
(christian-tchenko/LePoKet, ``gen_attention.py`` and ``trainer.py``). Three steps, Extraction →
Transfer → Mixture (ETM):

- **Extraction**: which parent stage outputs the child inherits (:attr:`HKTSettings.stages`,
  indices into ``model.stages``; default :data:`DEFAULT_STAGES`, or a user model's ``hkt_stages``).
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
the alignment modules are optimised; the parent is frozen (no grads, eval mode) and restored as it
was. The alignment modules live in :class:`HKTTrainer`, never in the child: the published child
runs alone.

Weight inheritance at spawn (:attr:`HKTSettings.inherit`, an extension measured by
``filial bench hkt``): the authors start HKT from an already trained child (their trainer resumes
the ResNet-20 checkpoint). A spawned child here is new, so by default (``inherit="auto"``) it starts
from the parent's leading channels of every feature-block tensor, and of the head when the parent
knows the slice's classes (:func:`inherit_weights`, :func:`known_classes`); HKT refines it;
``inherit="none"`` is the authors' loss on a freshly initialised child.

The engine's one entry point (everything the child needs; the parent is never modified)::

    from daemon.hkt import spawn_child, compact_architecture
    child = spawn_child(parent, compact_architecture(parent_arch, 0.5),    # or None: same size
                        model_input(x, data_type), y, epochs=settings.child_epochs,
                        lr=settings.learning_rate, batch_size=settings.train_batch_size,
                        method="hkt",            # "hkt" | "copy" | "scratch"
                        child_tuning=None,       # "fisher" | "bernoulli" (Child-Tuning masks)
                        generator=engine_generator)

:func:`train_hkt` retrains an existing child from a parent. Pure torch, no I/O.
"""

from __future__ import annotations

import copy
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, get_args

import torch
from torch import nn
from torch.nn import functional as F

from daemon.child_tuning import child_tuning_hook
from daemon.families import FAMILIES, Architecture
from daemon.policy import SpawnMethod
from daemon.training import GradHook, _autocast, minibatches, predict_logits, train_epochs

# Extraction default for every family (indices into ``model.stages``; negative counts from the end).
# The penultimate embedding, where the authors mix (their GA acts on the pooled (N, C) feature);
# `filial bench hkt` with ``hkt:stages=all`` measured no consistent gain from mixing every stage.
# A user model may name its own with an ``hkt_stages`` attribute.
DEFAULT_STAGES: tuple[int, ...] = (-1,)

SPAWN_METHODS: tuple[str, ...] = get_args(SpawnMethod)
INHERIT_MODES: tuple[str, ...] = ("none", "stages", "all", "auto")


@dataclass(frozen=True)
class HKTSettings:
    """How a child inherits. Defaults follow the authors' code (penultimate stage, alpha 0.6,
    the three cross-entropy terms weighted 1:1:1)."""

    stages: tuple[int, ...] | None = None      # None → DEFAULT_STAGES for the parent's family
    alpha: float = 0.6                         # z = q + alpha * (P - GA)
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # child CE, forward-mix CE, reverse-mix CE
    gates: bool = False                        # learned per-channel alpha (extension; off by default)
    reverse: bool = True                       # include the reverse-mix term (parent head)
    # Spawn init from the parent's leading channels (none|stages|all|auto; see inherit_for_spawn).
    # The authors start HKT from a trained child; a fresh compact child trained for a few epochs
    # lost to scratch without an inherited start in `filial bench hkt`, and an inherited head
    # wrecked class-incremental slices: "auto" takes the head only for classes the parent knows.
    inherit: str = "auto"
    head_known: float = 0.5                    # "auto": inherit the head when the parent knows this
                                               # share of the slice's classes (see known_classes)

    def __post_init__(self) -> None:
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError(f"HKT weights must be three non-negative numbers, got {self.weights!r}")
        if self.inherit not in INHERIT_MODES:
            raise ValueError(f"HKT inherit must be one of {', '.join(INHERIT_MODES)}, got {self.inherit!r}")
        if self.stages is not None and len(self.stages) == 0:
            raise ValueError("HKT stages must name at least one stage (or be None for the default)")


# ---------------------------------------------------------------------------------------------
# Mixture by Genetic Attention


def channel_dim(t: torch.Tensor) -> int:
    """Channel axis by convention: ``(N, C)`` → 1, ``(N, C, H, W)`` → 1, ``(N, T, C)`` → -1."""
    if t.dim() == 3:
        return -1
    if t.dim() in (2, 4, 5):
        return 1
    raise ValueError(f"cannot mix a tensor of shape {tuple(t.shape)}: expected (N,C), (N,T,C) or (N,C,H,W)")


def genetic_attention(q: torch.Tensor, p: torch.Tensor, alpha: float | torch.Tensor = 0.6
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Genetic Attention mix of a child feature ``q`` with an aligned parent feature ``p``.

    Returns ``(z, s, ga)``: ``s = sigmoid(<q, p> / sqrt(C))`` over the channel axis (one value per
    sample for ``(N, C)``, per position for maps and sequences, kept as a size-1 axis),
    ``ga = s*p + (1-s)*q`` and ``z = q + alpha*(p - ga)``. ``alpha`` may be a tensor broadcastable
    to ``q`` (per-channel gates).
    """
    if q.shape != p.shape:
        raise ValueError(f"genetic attention needs equal shapes, got {tuple(q.shape)} and {tuple(p.shape)}")
    dim = channel_dim(q)
    channels = q.shape[dim]
    s = torch.sigmoid((q * p).sum(dim=dim, keepdim=True) / math.sqrt(channels))
    ga = s * p + (1 - s) * q
    z = q + alpha * (p - ga)
    return z, s, ga


class ChannelGates(nn.Module):
    """Learned per-channel alpha in (0, 2*alpha0), starting at alpha0 (extension, off by default)."""

    def __init__(self, channels: int, alpha: float, ndim: int) -> None:
        super().__init__()
        self.alpha0 = alpha
        self.logit = nn.Parameter(torch.zeros(channels))
        self.ndim = ndim

    def forward(self) -> torch.Tensor:
        a = 2 * self.alpha0 * torch.sigmoid(self.logit)
        if self.ndim == 4:
            return a.view(1, -1, 1, 1)
        if self.ndim == 3:
            return a.view(1, 1, -1)
        return a.view(1, -1)


# ---------------------------------------------------------------------------------------------
# Transfer: alignment of one stage output to another model's shape at the same stage


def _channels_and_size(shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
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
        c_src, size_src = _channels_and_size(self.src)
        c_dst, size_dst = _channels_and_size(self.dst)
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


def _prepare(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    prep = getattr(model, "prepare", None)
    return prep(x) if callable(prep) else x


def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(model, "stage_outputs"):
        return list(model.stage_outputs(x))
    h, outs = _prepare(model, x), []
    for stage in model.stages:
        h = stage(h)
        outs.append(h)
    return outs


def default_stages(model: nn.Module) -> tuple[int, ...]:
    return getattr(model, "hkt_stages", DEFAULT_STAGES)


def resolve_stages(parent: nn.Module, child: nn.Module, stages: Sequence[int] | None) -> tuple[int, ...]:
    """Stage indices (non-negative, sorted) valid in both models; they must have as many stages."""
    n_parent, n_child = len(parent.stages), len(child.stages)
    if n_parent != n_child:
        raise ValueError(f"HKT pairs stages by index: the parent has {n_parent} stages, the child {n_child}")
    chosen = default_stages(parent) if stages is None else tuple(stages)
    resolved = set()
    for i in chosen:
        j = i + n_parent if i < 0 else i
        if not 0 <= j < n_parent:
            raise ValueError(f"HKT stage {i} out of range for a model with {n_parent} stages")
        resolved.add(j)
    return tuple(sorted(resolved))


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Parent in eval mode with ``requires_grad=False`` for the duration; restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The training wrapper


class HKTTrainer(nn.Module):
    """Child + alignment modules (+ gates). The parent is held outside the module tree
    (not a submodule, not in ``parameters()``/``state_dict()``)."""

    def __init__(self, parent: nn.Module, child: nn.Module, probe_x: torch.Tensor,
                 settings: HKTSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or HKTSettings()
        self.child = child
        self._parent = (parent,)  # tuple: not registered as a submodule
        self.stages = resolve_stages(parent, child, self.settings.stages)
        was_training = child.training
        child.eval()
        with torch.no_grad(), frozen(parent):
            p_shapes = [tuple(t.shape[1:]) for t in stage_outputs(parent, probe_x[:2])]
            c_shapes = [tuple(t.shape[1:]) for t in stage_outputs(child, probe_x[:2])]
        child.train(was_training)
        self.down = nn.ModuleDict({str(k): Align(p_shapes[k], c_shapes[k]) for k in self.stages})
        self.up = nn.ModuleDict({str(k): Align(c_shapes[k], p_shapes[k]) for k in self.stages}) \
            if self.settings.reverse else nn.ModuleDict()
        if self.settings.gates:
            self.gates_fwd = nn.ModuleDict({str(k): ChannelGates(_channels_and_size(c_shapes[k])[0],
                                                                 self.settings.alpha, len(c_shapes[k]) + 1)
                                            for k in self.stages})
            self.gates_rev = nn.ModuleDict({str(k): ChannelGates(_channels_and_size(p_shapes[k])[0],
                                                                 self.settings.alpha, len(p_shapes[k]) + 1)
                                            for k in self.stages})
        device = next(child.parameters()).device
        self.down.to(device)
        self.up.to(device)
        if self.settings.gates:
            self.gates_fwd.to(device)
            self.gates_rev.to(device)

    @property
    def parent(self) -> nn.Module:
        return self._parent[0]

    def _alpha(self, which: str, k: int) -> float | torch.Tensor:
        if not self.settings.gates:
            return self.settings.alpha
        return (self.gates_fwd if which == "fwd" else self.gates_rev)[str(k)]()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three HKT terms for one batch (the parent must be frozen by the caller)."""
        parent, child, ks = self.parent, self.child, self.stages
        with torch.no_grad():
            p_outs = stage_outputs(parent, x)
        c_outs = stage_outputs(child, x)
        logits = child.head(c_outs[-1])
        out = {"child": F.cross_entropy(logits, y)}
        first = ks[0]
        # forward mix: child stream with z substituted at each extracted stage, child head
        h = None
        for i in range(first, len(child.stages)):
            h = c_outs[i] if i == first else child.stages[i](h)
            if i in ks:
                h, _, _ = genetic_attention(h, self.down[str(i)](p_outs[i]), self._alpha("fwd", i))
        out["mix"] = F.cross_entropy(child.head(h), y)
        if self.settings.reverse:
            # reverse mix: q = child's output lifted to the parent's shape, P = parent stream; parent head
            h = None
            for i in range(first, len(parent.stages)):
                h = p_outs[i] if i == first else parent.stages[i](h)
                if i in ks:
                    h, _, _ = genetic_attention(self.up[str(i)](c_outs[i]), h, self._alpha("rev", i))
            out["reverse"] = F.cross_entropy(parent.head(h), y)
        w = self.settings.weights
        out["total"] = w[0] * out["child"] + w[1] * out["mix"] + (w[2] * out["reverse"] if "reverse" in out else 0)
        return out


GATE_LR_FACTOR = 10.0
EpochHook = Callable[[int, nn.Module, dict[str, float]], None]


def train_hkt(parent: nn.Module, child: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
              lr: float, batch_size: int = 64, settings: HKTSettings | None = None,
              generator: torch.Generator | None = None, before_step: GradHook | None = None,
              on_epoch: EpochHook | None = None) -> list[dict[str, float]]:
    """Train ``child`` in place with HKT from ``parent`` (frozen, restored afterwards).

    ``x`` is what the models eat (see :func:`daemon.training.model_input`). Adam over the child and
    the alignment modules (fresh each call: they are not part of the child). ``before_step`` runs
    between backward and step on the child (e.g. a Child-Tuning mask). ``on_epoch(epoch, child,
    losses)`` is called after every epoch (1-based) with the child in eval mode. Returns the mean
    of each loss term per epoch.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    device = next(child.parameters()).device
    x, y = x.to(device), y.to(device)
    history: list[dict[str, float]] = []
    with frozen(parent):
        trainer = HKTTrainer(parent, child, x, settings)
        gates = [p for n, p in trainer.named_parameters() if n.startswith("gates_")]
        gate_ids = {id(p) for p in gates}
        rest = [p for p in trainer.parameters() if p.requires_grad and id(p) not in gate_ids]
        groups = [{"params": rest}]
        if gates:
            # a spawn trains for a few epochs only: gates at the base lr would barely leave alpha0
            groups.append({"params": gates, "lr": lr * GATE_LR_FACTOR})
        optimizer = torch.optim.Adam(groups, lr=lr)
        for epoch in range(1, epochs + 1):
            child.train()
            sums: dict[str, float] = {}
            count = 0
            for idx in minibatches(len(x), batch_size, generator):
                idx = idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device):
                    terms = trainer.losses(x[idx], y[idx])
                terms["total"].backward()
                if before_step is not None:
                    before_step(child)
                optimizer.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * len(idx)
                count += len(idx)
            history.append({name: total / max(count, 1) for name, total in sums.items()})
            child.eval()
            if on_epoch is not None:
                on_epoch(epoch, child, history[-1])
    child.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Spawning


def fresh_like(model: nn.Module) -> nn.Module:
    """A same-architecture model with freshly initialised weights (every ``reset_parameters``)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


_RNN_GATES = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}


def _slice_to(src: torch.Tensor, shape: Sequence[int], blocks0: int = 1) -> torch.Tensor:
    """Leading slice of ``src`` along every dimension to ``shape``; dim 0 sliced per gate block."""
    if src.dim() != len(shape):
        raise ValueError(f"cannot inherit a tensor of shape {tuple(src.shape)} into {tuple(shape)}")
    out = src
    for d, size in enumerate(shape):
        have = out.shape[d]
        if size > have:
            raise ValueError(f"cannot inherit a tensor of shape {tuple(src.shape)} into larger {tuple(shape)}")
        if size == have:
            continue
        if d == 0 and blocks0 > 1 and have % blocks0 == 0 and size % blocks0 == 0:
            out = out.reshape(blocks0, have // blocks0, *out.shape[1:])[:, :size // blocks0]
            out = out.reshape(size, *out.shape[2:])
        else:
            out = out.narrow(d, 0, size)
    return out


@torch.no_grad()
def inherit_weights(parent: nn.Module, child: nn.Module, prefixes: Sequence[str] = ("stages.",)) -> list[str]:
    """Initialise a (narrower) child from the parent's leading channels of every tensor.

    Works for models whose width scales every layer and whose flattens are channel-major (the
    built-in families): taking the first ``k`` output channels of one layer and the first ``k``
    input channels of the next keeps the slices consistent; recurrent gate blocks are sliced per
    gate. Tensors missing from the parent, or of another rank, keep their fresh init. Returns the
    names of the inherited tensors. Only tensors whose names start with one of ``prefixes`` are
    inherited (default: the feature blocks; the head starts fresh, so a slice with new classes
    is not biased towards the parent's). The parent is not modified.
    """
    p_state = parent.state_dict()
    gates: dict[str, int] = {}
    for name, module in child.named_modules():
        for cls, g in _RNN_GATES.items():
            if isinstance(module, cls):
                gates[name] = g
    inherited = []
    for name, tensor in child.state_dict().items():
        src = p_state.get(name)
        if not name.startswith(tuple(prefixes)):
            continue
        if src is None or src.dim() != tensor.dim() or not tensor.is_floating_point():
            continue
        owner = name.rsplit(".", 1)[0]
        leaf = name.rsplit(".", 1)[-1]
        blocks = gates.get(owner, 1) if leaf.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")) else 1
        try:
            tensor.copy_(_slice_to(src, tensor.shape, blocks))
        except ValueError:
            continue
        inherited.append(name)
    return inherited


def _default_width(arch: Architecture) -> int | None:
    if "width" in arch.params:
        return int(arch.params["width"])
    factory = FAMILIES.get(arch.family)
    if factory is None:
        return None
    param = inspect.signature(factory).parameters.get("width")
    return None if param is None or param.default is inspect.Parameter.empty else int(param.default)


def compact_architecture(arch: Architecture, ratio: float = 0.5, width: int | None = None) -> Architecture:
    """The parent's architecture with ``width`` scaled by ``ratio`` (or set to ``width``).

    For a user model the factory must accept ``width``; otherwise the engine passes its own
    ``child_arch``."""
    if width is None:
        base = _default_width(arch)
        if base is None:
            raise ValueError(f"architecture {arch.family!r} has no 'width' parameter to scale; "
                             "pass child_width or a child architecture explicitly")
        width = max(1, int(round(base * ratio)))
    return arch.with_params(width=int(width))


def spawn_child(parent: nn.Module, child_arch: Architecture | None, x: torch.Tensor, y: torch.Tensor, *,
                epochs: int, lr: float, batch_size: int = 64, method: SpawnMethod = "hkt",
                settings: HKTSettings | None = None, child_tuning: str | None = None,
                child_tuning_p: float = 0.3, before_step: GradHook | None = None,
                generator: torch.Generator | None = None,
                on_epoch: EpochHook | None = None) -> nn.Module:
    """Build and train a child on ``(x, y)``; returns the child alone (no parent, no projections).

    - ``"hkt"``: a child of ``child_arch`` (or the parent's own architecture, freshly initialised,
      when None), initialised from the parent per ``settings.inherit`` and trained with
      :func:`train_hkt`;
    - ``"copy"``: a copy of the parent fine-tuned with cross-entropy (``child_arch`` must be the
      parent's architecture or None). With ``settings`` given, only what ``settings.inherit``
      takes is copied (``"auto"``: the head only when the parent knows the slice's classes; the
      rest starts fresh); without, everything is. ``child_tuning="fisher"`` (task-driven, mask
      from this data) or ``"bernoulli"`` (task-free) masks the gradients, keeping fraction
      ``child_tuning_p`` (any method; the mask is drawn after the inheritance);
    - ``"scratch"``: a fresh child of ``child_arch`` (or the parent's shape) trained alone.

    The parent is never modified. The child is placed on the parent's device.
    ``x`` is what the models eat (``model_input(wire_x, data_type)``).
    """
    if method not in SPAWN_METHODS:
        raise ValueError(f"unknown spawn method {method!r}: one of {', '.join(SPAWN_METHODS)}")
    if child_tuning is not None and before_step is not None:
        raise ValueError("pass either child_tuning or before_step, not both")
    device = next(parent.parameters()).device
    if method == "copy":
        child = copy.deepcopy(parent)
        if child_arch is not None:
            built = child_arch.build()
            try:
                built.load_state_dict(parent.state_dict())
            except RuntimeError as exc:
                raise ValueError("method 'copy' needs the parent's own architecture "
                                 f"(use 'hkt' for a compact child): {exc}") from exc
            child = built
        for p in child.parameters():
            p.requires_grad_(True)
        if settings is not None and settings.inherit != "all":
            child = fresh_like(child)
            inherit_for_spawn(parent, child, x, y, settings)
    else:
        child = child_arch.build() if child_arch is not None else fresh_like(parent)
    child = child.to(device)
    settings = settings or HKTSettings()
    if method == "hkt":
        inherit_for_spawn(parent, child, x, y, settings)
    if child_tuning is not None:
        # after the inheritance: the Fisher mask must rank the weights the child starts from
        before_step = child_tuning_hook(child, x.to(device), y.to(device), mode=child_tuning,
                                        p=child_tuning_p, batch_size=batch_size, generator=generator)
    if method == "hkt":
        train_hkt(parent, child, x, y, epochs=epochs, lr=lr, batch_size=batch_size, settings=settings,
                  generator=generator, before_step=before_step, on_epoch=on_epoch)
        return child
    optimizer = torch.optim.Adam(child.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        loss = train_epochs(child, x, y, epochs=1, lr=lr, batch_size=batch_size, generator=generator,
                            optimizer=optimizer, before_step=before_step)
        if on_epoch is not None:
            on_epoch(epoch, child, {"child": loss, "total": loss})
    child.eval()
    return child


@torch.no_grad()
def known_classes(parent: nn.Module, x: torch.Tensor, y: torch.Tensor, min_recall: float = 0.05) -> float:
    """Share of the classes present in ``y`` that the parent recognises at all (recall on ``x`` of at
    least ``min_recall``). Low on a class-incremental slice (the parent's head has only ever pushed
    those classes down), high on a covariate shift of known classes even when accuracy is poor."""
    with frozen(parent):
        predicted = predict_logits(parent, x).argmax(1)
    classes = y.unique()
    known = [bool((predicted[y == c] == c).float().mean() >= min_recall) for c in classes]
    return sum(known) / max(len(known), 1)


def inherit_for_spawn(parent: nn.Module, child: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      settings: HKTSettings) -> list[str]:
    """Apply ``settings.inherit`` to a new child: ``"none"``, ``"stages"`` (feature blocks),
    ``"all"`` (blocks and head) or ``"auto"`` (blocks; the head too when the parent knows at least
    ``settings.head_known`` of the slice's classes, :func:`known_classes`)."""
    mode = settings.inherit
    if mode == "none":
        return []
    prefixes: tuple[str, ...] = ("stages.",)
    if mode == "all" or (mode == "auto" and known_classes(parent, x, y) >= settings.head_known):
        prefixes = ("stages.", "head.")
    return inherit_weights(parent, child, prefixes)

