"""Spawning a child from the served model: a copy, a compact child trained with HKT, or scratch.

A compact child starts from the parent's weights where it can (:func:`inherit_for_spawn`): the
authors of HKT start from an already trained child (their trainer resumes a ResNet-20
checkpoint); a spawned child here is new, and a fresh compact child trained for a few epochs lost
to scratch without an inherited start in ``filial bench hkt``. So it takes the parent's leading
channels of every feature-block tensor (:func:`inherit_weights`), and of the head only when the
parent already recognises the slice's classes (:func:`known_classes`): an inherited head wrecked
class-incremental slices. HKT then refines it (:class:`daemon.learn.inherit.hkt.HKTLoss`).

The engine's entry point (the parent is never modified; the child runs alone)::

    child = spawn_child(parent, compact_architecture(parent_arch, 0.5),   # or None: same size
                        model_input(x, data_type), y, epochs=2, lr=1e-3, batch_size=64,
                        method="hkt",              # "hkt" | "copy" | "scratch"
                        child_tuning=None,         # "fisher" | "bernoulli" (Child-Tuning masks)
                        generator=engine_generator)
"""

from __future__ import annotations

import copy
import inspect
from typing import Sequence, get_args

import torch
from torch import nn

from daemon.learn.inherit.child_tuning import Mode, child_tuning_hook
from daemon.learn.inherit.hkt import HKTLoss
from daemon.learn.models import FAMILIES, Architecture
from daemon.learn.policy import SpawnMethod
from daemon.learn.training import CrossEntropy, Hook, fit, frozen, predict_logits

SPAWN_METHODS: tuple[str, ...] = get_args(SpawnMethod)
# the head is inherited when the parent recognises at least this share of the slice's classes
HEAD_KNOWN = 0.5


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
    inherited: dict[str, torch.Tensor] = {}
    state = child.state_dict()
    for name, tensor in state.items():
        src = p_state.get(name)
        if not name.startswith(tuple(prefixes)):
            continue
        if src is None or src.dim() != tensor.dim() or not tensor.is_floating_point():
            continue
        owner = name.rsplit(".", 1)[0]
        leaf = name.rsplit(".", 1)[-1]
        blocks = gates.get(owner, 1) if leaf.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")) else 1
        try:
            inherited[name] = _slice_to(src, tensor.shape, blocks)
        except ValueError:
            continue
    # loaded rather than copied into state_dict()'s tensors: a model may hand out copies (models.ImageCNN)
    child.load_state_dict({**state, **inherited})
    return list(inherited)


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


def inherit_for_spawn(parent: nn.Module, child: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """A new child's start: the parent's feature blocks, and its head too when the parent knows at
    least :data:`HEAD_KNOWN` of the slice's classes. Returns the inherited tensors' names."""
    prefixes: tuple[str, ...] = ("stages.",)
    if known_classes(parent, x, y) >= HEAD_KNOWN:
        prefixes = ("stages.", "head.")
    return inherit_weights(parent, child, prefixes)


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


def _copy_of(parent: nn.Module, child_arch: Architecture | None) -> nn.Module:
    """The parent's weights in a new model (of ``child_arch``, which must be the parent's shape)."""
    if child_arch is None:
        child = copy.deepcopy(parent)
    else:
        child = child_arch.build()
        try:
            child.load_state_dict(parent.state_dict())
        except RuntimeError as exc:
            raise ValueError("method 'copy' needs the parent's own architecture "
                             f"(use 'hkt' for a compact child): {exc}") from exc
    for p in child.parameters():
        p.requires_grad_(True)
    return child


def spawn_child(parent: nn.Module, child_arch: Architecture | None, x: torch.Tensor, y: torch.Tensor, *,
                epochs: int, lr: float, batch_size: int = 64, method: SpawnMethod = "hkt",
                label_smoothing: float = 0.0, child_tuning: Mode | None = None, child_tuning_p: float = 0.3,
                generator: torch.Generator | None = None, hooks: Sequence[Hook] = ()) -> nn.Module:
    """Build and train a child on ``(x, y)``; returns the child alone (no parent, no projections).

    - ``"hkt"``: a child of ``child_arch`` (or the parent's own architecture, freshly initialised,
      when None), started by :func:`inherit_for_spawn` and trained with :class:`HKTLoss`;
    - ``"copy"``: a copy of the parent fine-tuned with cross-entropy (``child_arch`` must be the
      parent's architecture or None);
    - ``"scratch"``: a fresh child of ``child_arch`` (or the parent's shape) trained alone.

    Cross-entropy targets ("copy", "scratch") are smoothed by ``label_smoothing``; HKT's loss has terms of its own.

    ``child_tuning="fisher"`` (task-driven, mask from this data) or ``"bernoulli"`` (task-free)
    masks the gradients, keeping fraction ``child_tuning_p`` (any method; the mask is drawn after
    the inheritance). ``hooks`` watch the training (e.g. an evaluation after every epoch).
    The parent is never modified. The child is placed on the parent's device.
    ``x`` is what the models eat (``model_input(wire_x, data_type)``).
    """
    if method not in SPAWN_METHODS:
        raise ValueError(f"unknown spawn method {method!r}: one of {', '.join(SPAWN_METHODS)}")
    device = next(parent.parameters()).device
    if method == "copy":
        child = _copy_of(parent, child_arch)
    else:
        child = child_arch.build() if child_arch is not None else fresh_like(parent)
    child = child.to(device)
    if method == "hkt":
        inherit_for_spawn(parent, child, x, y)
    steps = list(hooks)
    if child_tuning is not None:
        # after the inheritance: the Fisher mask must rank the weights the child starts from
        steps.insert(0, child_tuning_hook(child, x.to(device), y.to(device), mode=child_tuning,
                                          p=child_tuning_p, batch_size=batch_size, generator=generator))
    fit(child, x, y, loss=HKTLoss(parent) if method == "hkt" else CrossEntropy(label_smoothing), hooks=steps,
        epochs=epochs, lr=lr, batch_size=batch_size, generator=generator)
    return child
