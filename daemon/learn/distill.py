"""Bidirectional ensemble knowledge distillation: the ``distill`` merge, for children whose
architecture differs from the served model (seed 002; Hinton et al. 2015; DML, Zhang et al. 2018).

Pure torch, no I/O. On replay data ``(x, y)`` (model-ready inputs, see
``daemon.learn.training.model_input``):

1. **children -> served.** The ensemble teacher is the mean of the children's tempered softmaxes
   ``p_T = mean_c softmax(z_c / T)`` (children in eval mode, under ``no_grad``). The served model
   minimises ``alpha * CE(z_s, y) + beta * T^2 * KL(p_T || softmax(z_s / T))``.
2. **served -> children.** Each child minimises ``alpha * CE(z_c, y) + beta * T^2 *
   KL(softmax(z_s / T) || softmax(z_c / T))`` with the (updated) served model as teacher, plus,
   with ``peer=True``, the DML term ``peer_weight / (K-1) * sum_{l != c} KL(p_l || p_c)`` at T = 1
   (peers' predictions under ``no_grad``, refreshed every step).

Models are trained IN PLACE (pass copies to keep the originals) and left in eval mode. All models
must output the same number of classes. The engine's call::

    report = distill_into(candidate, [child_a, child_b], x_replay, y_replay, epochs=2)
    report.to_dict()   # for the manifest: KL before/after, losses
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import minibatches, predict_logits


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.float() / temperature, dim=-1)


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || softmax(student / T))``, mean over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean")


def hinton_loss(student_logits: torch.Tensor, y: torch.Tensor, teacher_probs: torch.Tensor,
                temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * CE + beta * T^2 * KL(teacher || student_T)``."""
    ce = F.cross_entropy(student_logits.float(), y)
    return alpha * ce + beta * temperature ** 2 * kd_kl(student_logits, teacher_probs, temperature)


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
    peer: bool = False

    def to_dict(self) -> dict:
        r = lambda v: round(float(v), 6)  # noqa: E731
        return {"method": "distill", "temperature": self.temperature, "epochs": self.epochs,
                "samples": self.samples, "peer": self.peer,
                "served_kl_before": r(self.served_kl_before), "served_kl_after": r(self.served_kl_after),
                "served_loss": r(self.served_loss),
                "child_kl_before": [r(v) for v in self.child_kl_before],
                "child_kl_after": [r(v) for v in self.child_kl_after],
                "child_loss": [r(v) for v in self.child_loss]}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _train_students(students: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                    teachers: Sequence[nn.Module], *, peer: bool, temperature: float, alpha: float,
                    beta: float, peer_weight: float, epochs: int, lr: float, batch_size: int,
                    generator: torch.Generator | None) -> list[float]:
    """Per mini-batch, each student in turn takes one Adam step on the Hinton loss against the
    teachers' ensemble (+ the DML term against the other students' current predictions).
    Returns each student's mean loss over the last epoch."""
    optimizers = [torch.optim.Adam(s.parameters(), lr=lr) for s in students]
    for t in teachers:
        t.eval()
    last = [0.0] * len(students)
    for _ in range(epochs):
        totals, count = [0.0] * len(students), 0
        for idx in minibatches(len(x), batch_size, generator):
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                teacher_probs = torch.stack([tempered_softmax(t(xb.to(_device(t))), temperature).cpu()
                                             for t in teachers]).mean(0)
            for k, (student, opt) in enumerate(zip(students, optimizers)):
                dev = _device(student)
                peer_probs = []
                if peer and len(students) > 1:
                    with torch.no_grad():
                        for j, other in enumerate(students):
                            if j != k:
                                other.eval()
                                peer_probs.append(F.softmax(other(xb.to(_device(other))).float(), -1).to(dev))
                student.train()
                logits = student(xb.to(dev))
                loss = hinton_loss(logits, yb.to(dev), teacher_probs.to(dev), temperature, alpha, beta)
                if peer_probs:
                    log_p = F.log_softmax(logits.float(), -1)
                    loss = loss + peer_weight / len(peer_probs) * sum(
                        F.kl_div(log_p, q, reduction="batchmean") for q in peer_probs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals[k] += loss.item() * len(idx)
            count += len(idx)
        last = [t / max(count, 1) for t in totals]
    for s in students:
        s.eval()
    return last


def distill_into(served: nn.Module, children: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                 temperature: float = 4.0, alpha: float = 0.5, beta: float = 0.5, epochs: int = 2,
                 lr: float = 1e-3, batch_size: int = 64, peer: bool = False, peer_weight: float = 1.0,
                 child_epochs: int | None = None, generator: torch.Generator | None = None) -> DistillReport:
    """Served learns from the children's ensemble, then each child learns back from the served.

    ``alpha``/``beta`` weigh CE and the T²-scaled KD term; ``child_epochs`` (default ``epochs``;
    0 skips the backward direction); ``peer`` adds the DML term among children.
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
    common = dict(temperature=temperature, alpha=alpha, beta=beta, lr=lr, batch_size=batch_size,
                  generator=generator)

    teacher = ensemble_probs(children, x, temperature)
    kl_before = mean_kl(served, teacher, x, temperature)
    served_loss = _train_students([served], x, y, children, peer=False, peer_weight=0.0,
                                  epochs=epochs, **common)[0] if epochs > 0 else float("nan")
    kl_after = mean_kl(served, teacher, x, temperature)

    served_probs = ensemble_probs([served], x, temperature)
    before = [mean_kl(c, served_probs, x, temperature) for c in children]
    losses = (_train_students(list(children), x, y, [served], peer=peer, peer_weight=peer_weight,
                              epochs=child_epochs, **common)
              if child_epochs > 0 else [float("nan")] * len(children))
    after = [mean_kl(c, served_probs, x, temperature) for c in children]
    return DistillReport(temperature, epochs, len(x), kl_before, kl_after, served_loss,
                         before, after, losses, peer)
