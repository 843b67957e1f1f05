"""The baselines of ``filial bench cl``: Avalanche 0.6 strategies on the same tensors, with the same
architecture (:func:`daemon.learn.models.infer_architecture`), optimiser (Adam at the learner's
learning rate), mini-batch size and evaluation (:func:`daemon.learn.training.accuracy`) as filial.

Contenders (``avalanche.training.supervised``):

- ``naive``: fine-tuning on each experience (``Naive``);
- ``ewc``: ``EWC`` (separate penalties, ``--ewc-lambda``);
- ``lwf``: ``LwF`` (``--lwf-alpha``, ``--lwf-temperature``);
- ``replay200``, ``replay500``, ``replay_filial``: ``Replay`` with an experience-balanced buffer
  (Avalanche's default storage policy) of 200, 500 rows, and as many rows as filial stores on that
  stream (its replay plus held-out buffers);
- ``gdumb500``, ``gdumb_filial``: ``GDumb`` (class-balanced memory, retrained from scratch at every
  experience) with 500 rows and with filial's stored rows;
- ``joint``: ``JointTraining`` on every experience at once (the ceiling; its matrix has one row).

Each needs the ``bench`` extra: ``pip install 'filial[bench]'`` (avalanche-lib 0.6.0).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.cl_streams import Stream
from daemon.learn.models import infer_architecture
from daemon.learn.training import accuracy, model_input

BASELINES = ("naive", "ewc", "lwf", "replay200", "replay500", "replay_filial", "gdumb500", "gdumb_filial",
             "joint")
BASELINE_IMPL = "avalanche-0.6.0"
INSTALL_HINT = "pip install 'filial[bench]' (in a checkout: pip install -e '.[bench]')"


def avalanche_problem() -> str | None:
    """One line saying what to install when Avalanche 0.6 is not importable here; None when it is."""
    try:
        import avalanche
        from avalanche.training.supervised import Naive  # noqa: F401  (the part the baselines use)
    except ImportError as exc:
        return f"the baselines need avalanche-lib 0.6.0 ({exc}); install the bench extra: {INSTALL_HINT}"
    version = getattr(avalanche, "__version__", "?")
    if not str(version).startswith("0.6"):
        return f"the baselines were written for avalanche-lib 0.6.0, found {version}; {INSTALL_HINT}"
    return None


class StepCounter:
    """Counts every optimiser step taken in this process while open (a global post-step hook)."""

    def __init__(self) -> None:
        self.steps = 0
        self._handle = None

    def __enter__(self) -> "StepCounter":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(*_: Any) -> None:
            self.steps += 1

        self._handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@dataclass
class BaselineRun:
    matrix: list[list[float]]
    order: list[int]
    seconds: float
    optimizer_steps: int
    stored_rows: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Baselines:
    """Avalanche datasets of one stream, built once, and the runs of every contender on them."""

    def __init__(self, stream: Stream, *, lr: float, batch_size: int, device: torch.device,
                 ewc_lambda: float, lwf_alpha: float, lwf_temperature: float) -> None:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils.classification_dataset import (
            _make_taskaware_tensor_classification_dataset as tensor_dataset)

        self.stream = stream
        self.lr, self.batch_size, self.device = lr, batch_size, device
        self.ewc_lambda, self.lwf_alpha, self.lwf_temperature = ewc_lambda, lwf_alpha, lwf_temperature
        dt = stream.data_type
        self.tests = [(model_input(s.x_test, dt), s.y_test) for s in stream.slices]
        train = [tensor_dataset(model_input(s.x_train, dt), s.y_train, targets=s.y_train, task_labels=0)
                 for s in stream.experiences()]
        self.scenario = benchmark_from_datasets(train=train)
        self.train_rows = sum(len(s.y_train) for s in stream.experiences())
        self.arch = infer_architecture(dt, stream.slices[0].x_train[:2], stream.num_classes, None)

    def evaluate(self, model: torch.nn.Module) -> list[float]:
        return [accuracy(model, x, y) for x, y in self.tests]

    def _strategy(self, name: str, model: torch.nn.Module, epochs: int, filial_rows: int):
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import EWC, GDumb, JointTraining, LwF, Naive, Replay

        common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=self.lr),
                      criterion=torch.nn.CrossEntropyLoss(), train_mb_size=self.batch_size, train_epochs=epochs,
                      eval_mb_size=1024, device=self.device, evaluator=EvaluationPlugin(loggers=[]))
        if name == "naive":
            return Naive(**common), 0
        if name == "ewc":
            return EWC(ewc_lambda=self.ewc_lambda, mode="separate", **common), 0
        if name == "lwf":
            return LwF(alpha=self.lwf_alpha, temperature=self.lwf_temperature, **common), 0
        if name == "joint":
            return JointTraining(**common), self.train_rows
        prefix, cls = ("replay", Replay) if name.startswith("replay") else ("gdumb", GDumb)
        size = name[len(prefix):]
        mem = max(1, min(filial_rows if size == "_filial" else int(size), self.train_rows))
        return cls(mem_size=mem, **common), mem

    def run(self, name: str, epochs: int, seed: int, filial_rows: int) -> BaselineRun:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
        seed_everything(seed)
        model = self.arch.build().to(self.device)
        # Avalanche's warnings (no loggers, buffer resizing) and anything it prints stay off stdout
        # record=True: Avalanche's deprecation decorator turns its warnings back on inside its own scope
        with warnings.catch_warnings(record=True), contextlib.redirect_stdout(sys.stderr), StepCounter() as steps:
            warnings.simplefilter("ignore")
            strategy, stored = self._strategy(name, model, epochs, filial_rows)
            started = time.perf_counter()
            matrix: list[list[float]] = []
            if name == "joint":
                strategy.train(self.scenario.train_stream)
                matrix.append(self.evaluate(strategy.model))
                order = [self.stream.order[-1]]
            else:
                for experience in self.scenario.train_stream:
                    strategy.train(experience)
                    matrix.append(self.evaluate(strategy.model))
                order = list(self.stream.order)
            seconds = time.perf_counter() - started
        return BaselineRun(matrix, order, seconds, steps.steps, stored)
