"""Child-Tuning (Xu et al. 2021, "Raise a Child in Large Language Model"): update only a "child"
subset of the parameters by masking gradients between ``backward`` and ``step``.

- Task-driven (CT-D): the child is the top fraction ``p`` of parameters by diagonal Fisher
  information, ``F = mean over batches of grad**2`` on the task data, chosen once before training
  with one global threshold across tensors; the mask stays fixed.
- Task-free (CT-F): every step a fresh Bernoulli(``p``) mask per element, the kept gradients scaled
  by ``1/p`` so the expected gradient is unchanged.

Both are step hooks (:class:`daemon.learn.training.Hook`: the mask is applied in ``before_step``,
between ``backward`` and the optimiser step), for ``fit(..., hooks=[hook])`` with any loss.
Parameters whose names start with one of ``always`` (default: the head, which a new slice may
need to re-learn, like the freshly initialised classifier in the paper) are always trained in full.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import Hook, minibatches

ALWAYS_TRAINED: tuple[str, ...] = ("head.",)
Mode = Literal["fisher", "bernoulli"]


def _selected(model: nn.Module, always: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    always = tuple(always)
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(always)]


def fisher_information(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                       max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: the mean over mini-batches of the squared gradient of the loss, per element
    (``batch_size=1`` gives the per-sample estimate). The model's grads are left cleared."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    batches = 0
    for idx in minibatches(len(x), batch_size, shuffle=False):
        if max_batches is not None and batches >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None and n in fisher:
                fisher[n] += p.grad.detach() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(batches, 1) for n, f in fisher.items()}


def fisher_mask(fisher: dict[str, torch.Tensor], p: float,
                always: Iterable[str] = ALWAYS_TRAINED) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly ``round(p * n)`` (at least 1) elements with the largest Fisher
    values across all selected tensors (one global ranking); ``always`` tensors are all True."""
    if not 0 < p <= 1:
        raise ValueError(f"child-tuning fraction p must be in (0, 1], got {p}")
    always = tuple(always)
    ranked = [n for n in fisher if not n.startswith(always)]
    masks = {n: torch.ones_like(f, dtype=torch.bool) for n, f in fisher.items() if n.startswith(always)}
    if not ranked:
        return masks
    flat = torch.cat([fisher[n].flatten().float() for n in ranked])
    keep = max(1, int(round(p * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    offset = 0
    for n in ranked:
        size = fisher[n].numel()
        masks[n] = chosen[offset:offset + size].view_as(fisher[n])
        offset += size
    return masks


class TaskDrivenMask(Hook):
    """CT-D hook: zero the gradient outside the fixed Fisher mask (no rescaling)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    def before_step(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            mask = self.masks.get(n)
            if mask is not None and p.grad is not None:
                p.grad.mul_(mask.to(device=p.grad.device, dtype=p.grad.dtype))


class BernoulliMask(Hook):
    """CT-F hook: each step, keep each gradient element with probability ``p`` and scale it by 1/p."""

    def __init__(self, p: float, generator: torch.Generator | None = None,
                 always: Iterable[str] = ALWAYS_TRAINED) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"child-tuning fraction p must be in (0, 1], got {p}")
        self.p = p
        self.generator = generator
        self.always = tuple(always)

    def before_step(self, model: nn.Module) -> None:
        for n, param in _selected(model, self.always):
            if param.grad is None:
                continue
            probs = torch.full(param.grad.shape, self.p, device="cpu")
            keep = torch.bernoulli(probs, generator=self.generator).to(param.grad.device, param.grad.dtype)
            param.grad.mul_(keep).div_(self.p)


def child_tuning_hook(model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                      mode: Mode = "fisher", p: float = 0.3, batch_size: int = 64,
                      generator: torch.Generator | None = None,
                      always: Iterable[str] = ALWAYS_TRAINED) -> Hook:
    """The step hook for Child-Tuning ``model`` on ``(x, y)``: ``"fisher"`` (CT-D,
    needs the data to compute the Fisher mask now) or ``"bernoulli"`` (CT-F)."""
    if mode == "bernoulli":
        return BernoulliMask(p, generator=generator, always=always)
    if mode == "fisher":
        if x is None or y is None:
            raise ValueError("task-driven child-tuning needs the task data (x, y) for the Fisher mask")
        return TaskDrivenMask(fisher_mask(fisher_information(model, x, y, batch_size=batch_size), p, always))
    raise ValueError(f"unknown child-tuning mode {mode!r}: 'fisher' or 'bernoulli'")
