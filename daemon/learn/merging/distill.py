"""Bidirectional ensemble knowledge distillation: the ``distill`` merge, for children whose
architecture differs from the served model (Hinton et al. 2015, "Distilling the Knowledge in a
Neural Network"; the back-and-forth after Zhang et al. 2018, "Deep Mutual Learning").

Pure torch, no I/O. On replay data ``(x, y)`` (model-ready inputs, see
``daemon.learn.training.model_input``):

1. **children -> served.** The ensemble teacher is the mean of the children's tempered softmaxes
   ``p_T = mean_c softmax(z_c / T)`` (children frozen, under ``no_grad``). The served model
   minimises ``alpha * CE(z_s, y) + beta * T^2 * KL(p_T || softmax(z_s / T))``.
2. **served -> children.** Each child minimises ``alpha * CE(z_c, y) + beta * T^2 *
   KL(softmax(z_s / T) || softmax(z_c / T))`` with the (updated) served model as teacher.

Both directions are :func:`daemon.learn.training.fit` with the :class:`KnowledgeDistillation`
loss. Models are trained IN PLACE (pass copies to keep the originals) and left in eval mode. All
models must output the same number of classes. The engine's call::

    report = distill_into(candidate, [child_a, child_b], x_replay, y_replay, epochs=2)
    report.to_dict()   # for the manifest: KL before/after, losses
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import Loss, Terms, fit, frozen, predict_logits


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.float() / temperature, dim=-1)


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || softmax(student / T))``, mean over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean")


def kd_kl_rows(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || softmax(student / T))`` of each row (what :func:`kd_kl` averages)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(-1)


def hinton_loss(student_logits: torch.Tensor, y: torch.Tensor, teacher_probs: torch.Tensor,
                temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * CE + beta * T^2 * KL(teacher || student_T)``."""
    ce = F.cross_entropy(student_logits.float(), y)
    return alpha * ce + beta * temperature ** 2 * kd_kl(student_logits, teacher_probs, temperature)


class KnowledgeDistillation(Loss):
    """:func:`hinton_loss` against the mean tempered softmax of ``teachers`` on the same batch.
    The teachers are frozen for the fit (eval mode, no grads) and restored afterwards."""

    def __init__(self, teachers: Sequence[nn.Module], temperature: float = 4.0, alpha: float = 0.5,
                 beta: float = 0.5) -> None:
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.teachers, self.temperature, self.alpha, self.beta = list(teachers), temperature, alpha, beta

    @contextmanager
    def bind(self, model: nn.Module, x: torch.Tensor) -> Iterator[list]:
        with ExitStack() as stack:
            for teacher in self.teachers:
                stack.enter_context(frozen(teacher))
            yield []

    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([tempered_softmax(t(x.to(_device(t))), self.temperature).to(x.device)
                            for t in self.teachers]).mean(0)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        teacher = self.teacher_probs(x)
        return {"total": hinton_loss(model(x), y, teacher, self.temperature, self.alpha, self.beta)}


class CongruentDistillation(Loss):
    """Positive-congruent training (Yan et al. 2021, "Positive-Congruent Training: Towards
    Regression-Free Model Updates", focal distillation): ``CE(z, y) + weight * T^2 * mean_i
    [old right on i] * KL(softmax(z_old,i / T) || softmax(z_i / T))``. The model keeps the old one's
    predictions where the old one is right and is free where it is wrong, so an update loses fewer of
    the rows its predecessor got right ("negative flips"). ``old`` is frozen for the fit."""

    def __init__(self, old: nn.Module, weight: float, temperature: float = 2.0, label_smoothing: float = 0.0) -> None:
        if weight < 0 or temperature <= 0:
            raise ValueError(f"weight must be >= 0 and temperature > 0, got {weight}, {temperature}")
        self.old, self.weight, self.temperature, self.label_smoothing = old, weight, temperature, label_smoothing

    @contextmanager
    def bind(self, model: nn.Module, x: torch.Tensor) -> Iterator[list]:
        with frozen(self.old):
            yield []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        logits = model(x).float()
        with torch.no_grad():
            old = self.old(x).float()
            right = (old.argmax(1) == y).float()
            target = tempered_softmax(old, self.temperature)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        congruence = (right * kd_kl_rows(logits, target, self.temperature)).mean() * self.temperature ** 2
        return {"total": ce + self.weight * congruence, "cross_entropy": ce, "congruence": congruence}


@torch.no_grad()
def ensemble_probs(models: Sequence[nn.Module], x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean of the models' tempered softmaxes on ``x`` (CPU, float32)."""
    return torch.stack([tempered_softmax(predict_logits(m, x), temperature) for m in models]).mean(0)


@torch.no_grad()
def mean_kl(student: nn.Module, teacher_probs: torch.Tensor, x: torch.Tensor, temperature: float) -> float:
    """``KL(teacher || student_T)`` over all of ``x``."""
    return kd_kl(predict_logits(student, x), teacher_probs, temperature).item()


@dataclass
class DistillReport:
    temperature: float
    epochs: int
    samples: int
    served_kl_before: float          # KL(children ensemble || served), tempered
    served_kl_after: float
    served_loss: float               # mean Hinton loss of the served model's last epoch
    child_kl_before: list[float] = field(default_factory=list)   # KL(served || child), tempered
    child_kl_after: list[float] = field(default_factory=list)
    child_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        r = lambda v: round(float(v), 6)  # noqa: E731
        return {"method": "distill", "temperature": self.temperature, "epochs": self.epochs,
                "samples": self.samples,
                "served_kl_before": r(self.served_kl_before), "served_kl_after": r(self.served_kl_after),
                "served_loss": r(self.served_loss),
                "child_kl_before": [r(v) for v in self.child_kl_before],
                "child_kl_after": [r(v) for v in self.child_kl_after],
                "child_loss": [r(v) for v in self.child_loss]}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def distill_into(served: nn.Module, children: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                 temperature: float = 4.0, alpha: float = 0.5, beta: float = 0.5, epochs: int = 2,
                 lr: float = 1e-3, batch_size: int = 64, child_epochs: int | None = None,
                 generator: torch.Generator | None = None) -> DistillReport:
    """Served learns from the children's ensemble, then each child learns back from the served.

    ``alpha``/``beta`` weigh CE and the T²-scaled KD term; ``child_epochs`` (default ``epochs``;
    0 skips the backward direction).
    """
    if not children:
        raise ValueError("distillation needs at least one child")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"replay data must be non-empty with one label per sample ({len(x)} vs {len(y)})")
    widths = {predict_logits(m, x[:2]).shape[-1] for m in [served, *children]}
    if len(widths) != 1:
        raise ValueError(f"served model and children must output the same classes, got widths {sorted(widths)}")
    child_epochs = epochs if child_epochs is None else child_epochs
    common = dict(lr=lr, batch_size=batch_size, generator=generator)
    kd = dict(temperature=temperature, alpha=alpha, beta=beta)

    teacher = ensemble_probs(children, x, temperature)
    kl_before = mean_kl(served, teacher, x, temperature)
    served_loss = (fit(served, x, y, loss=KnowledgeDistillation(children, **kd), epochs=epochs, **common)[-1]["total"]
                   if epochs > 0 else float("nan"))
    kl_after = mean_kl(served, teacher, x, temperature)

    served_probs = ensemble_probs([served], x, temperature)
    before = [mean_kl(c, served_probs, x, temperature) for c in children]
    losses = [float("nan")] * len(children)
    if child_epochs > 0:
        # every child sees the same mini-batches (the children do not interact, so training them
        # one after the other from the same generator state is training them side by side)
        gen = generator if generator is not None else torch.default_generator
        start = gen.get_state()
        for i, child in enumerate(children):
            gen.set_state(start)
            losses[i] = fit(child, x, y, loss=KnowledgeDistillation([served], **kd), epochs=child_epochs,
                            **{**common, "generator": gen})[-1]["total"]
    after = [mean_kl(c, served_probs, x, temperature) for c in children]
    return DistillReport(temperature, epochs, len(x), kl_before, kl_after, served_loss, before, after, losses)
