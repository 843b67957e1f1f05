"""``filial bench throughput``'s raw loop: the daemon's training calls, recorded, then replayed in plain torch.

:class:`TrainingRecorder` (the benchmark only; nothing in the daemon knows of it) wraps the two
places where a batch trains a model, ``daemon.engine.learner.fit`` (the served model's bootstrap and
updates, a child's retrain) and ``daemon.learn.inherit.spawn.fit`` (a new child), and records each
call: the batch it belongs to, rows (new rows plus replay), epochs, mini-batch size, learning rate,
the model's architecture and the loss. It also counts the optimizer steps those calls take (a global
post-step hook that counts only inside a recorded call, so the merge job's consolidation and
distillation, which train in their own thread through other imports of ``fit``, are not counted).

:func:`replay` runs the same calls on fresh models of the same architectures: Adam at the same
learning rate, the same mini-batch size, a fresh optimizer per call (as ``fit`` makes), one
permutation per epoch, ``epochs x ceil(rows / batch)`` steps of cross-entropy on in-memory tensors of
the same row counts (real rows of the stream, already in model form), in the calling thread with its
torch threads, in the precision the daemon computed in (bf16 autocast where ``precision`` made it so:
the same work), or float32 when asked (the plain loop a user would write). What it leaves out is
everything that is not a training step: Kafka, decoding, the split, the served model's forward pass
and drift score, routing, fingerprints, buffers, replay sampling, the state snapshot, checkpoints,
publishes and merges. With the default settings every
call is cross-entropy (full-size children are copies); a call with another loss (HKT, compact
children) is replayed as cross-entropy too and counted in ``other_losses``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import precision_name


@dataclass(frozen=True)
class TrainCall:
    batch: int        # index of the batch being applied (0-based, in arrival order)
    rows: int         # new rows plus replayed rows
    epochs: int
    batch_size: int
    lr: float
    model: str        # key of the architecture (TrainingRecorder.templates)
    loss: str         # the Loss class, "CrossEntropy" by default
    path: str         # "learner" (served model, retrained child) | "spawn" (a new child)
    label_smoothing: float = 0.0  # the cross-entropy's, as the daemon trained
    precision: str = "float32"    # what the daemon computed in: "float32" or "bfloat16" (autocast)

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.rows // self.batch_size)


def model_key(model: nn.Module) -> str:
    return type(model).__name__ + ":" + ",".join(f"{n}{tuple(p.shape)}" for n, p in model.named_parameters())


class TrainingRecorder:
    """``with TrainingRecorder() as rec:`` records the learner's training calls; call :meth:`next_batch`
    after each applied batch (the service's ``on_result``)."""

    def __init__(self) -> None:
        self.calls: list[TrainCall] = []
        self.templates: dict[str, nn.Module] = {}   # one copy of each architecture trained
        self.steps: Counter[int] = Counter()         # optimizer steps per batch index
        self.batch = 0
        self._local = threading.local()
        self._restore: list[tuple[Any, Any]] = []
        self._hook = None

    def next_batch(self) -> None:
        self.batch += 1

    def steps_from(self, first_batch: int) -> int:
        return sum(n for b, n in self.steps.items() if b >= first_batch)

    def _wrap(self, original, path: str):
        def recorded_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any):
            key = model_key(model)
            if key not in self.templates:
                self.templates[key] = copy.deepcopy(model).cpu()
            loss = kwargs.get("loss")
            self.calls.append(TrainCall(self.batch, len(x), kwargs["epochs"], kwargs.get("batch_size", 64),
                                        kwargs["lr"], key, type(loss).__name__ if loss is not None else "CrossEntropy",
                                        path, getattr(loss, "label_smoothing", 0.0),
                                        precision_name(next(model.parameters()).device)))
            self._local.batch = self.batch
            try:
                return original(model, x, y, **kwargs)
            finally:
                self._local.batch = None
        return recorded_fit

    def __enter__(self) -> "TrainingRecorder":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        import daemon.engine.learner as learner
        import daemon.learn.inherit.spawn as spawn

        for module, path in ((learner, "learner"), (spawn, "spawn")):
            self._restore.append((module, module.fit))
            module.fit = self._wrap(module.fit, path)

        def count(*_: Any) -> None:
            batch = getattr(self._local, "batch", None)
            if batch is not None:
                self.steps[batch] += 1

        self._hook = register_optimizer_step_post_hook(count)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, original in reversed(self._restore):
            module.fit = original
        self._restore.clear()
        self._hook.remove()


class _Steps:
    """Optimizer steps taken in this thread while open."""

    def __init__(self) -> None:
        self.count, self._thread, self._hook = 0, threading.get_ident(), None

    def __enter__(self) -> "_Steps":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(*_: Any) -> None:
            if threading.get_ident() == self._thread:
                self.count += 1

        self._hook = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()


def _fresh(template: nn.Module) -> nn.Module:
    from daemon.learn.inherit.spawn import fresh_like

    return fresh_like(template)


def _pool(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    while len(y) < rows:
        x, y = torch.cat([x, x]), torch.cat([y, y])
    return x, y


def run_once(calls: list[TrainCall], templates: dict[str, nn.Module], x: torch.Tensor,
             y: torch.Tensor, seed: int = 0, precision: str | None = None) -> tuple[float, int]:
    """One pass over ``calls``: (seconds, optimizer steps). Models are built before the clock starts.
    Each call computes in its recorded precision, or in ``precision`` when given."""
    models = {key: _fresh(t) for key, t in templates.items()}
    x, y = _pool(x, y, max((c.rows for c in calls), default=0))
    gen = torch.Generator().manual_seed(seed)
    with _Steps() as steps:
        started = time.perf_counter()
        for call in calls:
            model = models[call.model]
            optimizer = torch.optim.Adam(model.parameters(), lr=call.lr)
            xs, ys = x[:call.rows], y[:call.rows]
            for _ in range(call.epochs):
                model.train()
                order = torch.randperm(call.rows, generator=gen)
                for start in range(0, call.rows, call.batch_size):
                    idx = order[start:start + call.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(precision or call.precision):
                        loss = F.cross_entropy(model(xs[idx]), ys[idx], label_smoothing=call.label_smoothing)
                    loss.backward()
                    optimizer.step()
            model.eval()
        seconds = time.perf_counter() - started
    return seconds, steps.count


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()


def replay(calls: list[TrainCall], templates: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
           repeats: int = 3, precision: str | None = None) -> dict[str, Any]:
    """The raw loop, best of ``repeats``: seconds of each pass and the steps of one; every call in
    ``precision`` when given, else in the daemon's."""
    runs = [run_once(calls, templates, x, y, seed=i, precision=precision) for i in range(repeats)]
    seconds = [s for s, _ in runs]
    return {"seconds": min(seconds), "repeats": [round(s, 3) for s in seconds], "optimizer_steps": runs[0][1],
            "steps_from_calls": sum(c.steps for c in calls), "calls": len(calls),
            "rows_x_epochs": sum(c.rows * c.epochs for c in calls),
            "other_losses": sum(c.loss != "CrossEntropy" for c in calls),
            "precision": precision or ",".join(sorted({c.precision for c in calls})),
            "by_path": dict(Counter(c.path for c in calls))}
