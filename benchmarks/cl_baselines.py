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

A run seeds every generator and builds its model on datasets built once per stream, so its matrix
depends on its :class:`Task` alone, not on the runs before it or the process it runs in: a
:class:`WorkerPool` runs them in worker processes (``python -m benchmarks.cl_baselines --worker``,
one torch thread each, longest first; tasks and results travel as JSON lines, like everything filial
exchanges), an :class:`InlinePool` here, one after another. :class:`Plan`: the first seed at every
epochs setting, then the other seeds at the best one. Over 300 lines: the strategies, and the pool
that runs them on every core.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import queue
import random
import subprocess
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np
import torch

from benchmarks.cl_metrics import avg_acc
from benchmarks.cl_streams import Stream, build_stream
from daemon.learn.models import infer_architecture
from daemon.learn.training import accuracy, model_input

BASELINES = ("naive", "ewc", "lwf", "replay200", "replay500", "replay_filial", "gdumb500", "gdumb_filial",
             "joint")
BASELINE_IMPL = "avalanche-0.6.0"
INSTALL_HINT = "pip install 'filial[bench]' (in a checkout: pip install -e '.[bench]')"
# relative seconds per epoch and train row (measured on split, 20 epochs, one thread): the pool's order
COST = {"naive": 1.0, "ewc": 1.05, "lwf": 1.2, "replay200": 1.6, "replay500": 1.6, "replay_filial": 1.65,
        "gdumb500": 0.7, "gdumb_filial": 3.0, "joint": 1.0}
COST_BY_TYPE = {"image": 1.0, "tabular": 0.05}


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


@dataclass(frozen=True)
class Spec:
    """What rebuilds one stream's :class:`Baselines` in any process, JSON-able: the stream by name (its
    builder is seeded), the dataset it is cut from, and the training settings."""
    stream: str
    dataset: str | None
    rows_per_slice: int | None
    data_type: str
    lr: float
    batch_size: int
    device: str
    ewc_lambda: float
    lwf_alpha: float
    lwf_temperature: float
    label_smoothing: float = 0.0  # the strategies' cross-entropy (0: as Avalanche users train them)


@dataclass(frozen=True)
class Task:
    spec: Spec
    name: str
    epochs: int
    seed: int
    filial_rows: int  # the memory of replay_filial and gdumb_filial

    def cost(self) -> float:
        """Rough seconds, to start the longest runs first and leave short ones for the pool's tail (filial's
        rows stand for the stream's train rows: it keeps about all of them)."""
        return self.epochs * self.filial_rows * COST.get(self.name, 1.0) * COST_BY_TYPE.get(self.spec.data_type, 1.0)


class Baselines:
    """Avalanche datasets of one stream, built once, and the runs of every contender on them."""

    def __init__(self, spec: Spec, stream: Stream) -> None:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils.classification_dataset import (
            _make_taskaware_tensor_classification_dataset as tensor_dataset)

        self.spec, self.stream, self.device = spec, stream, torch.device(spec.device)
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

        common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=self.spec.lr),
                      criterion=torch.nn.CrossEntropyLoss(label_smoothing=self.spec.label_smoothing),
                      train_mb_size=self.spec.batch_size, train_epochs=epochs,
                      eval_mb_size=1024, device=self.device, evaluator=EvaluationPlugin(loggers=[]))
        if name == "naive":
            return Naive(**common), 0
        if name == "ewc":
            return EWC(ewc_lambda=self.spec.ewc_lambda, mode="separate", **common), 0
        if name == "lwf":
            return LwF(alpha=self.spec.lwf_alpha, temperature=self.spec.lwf_temperature, **common), 0
        if name == "joint":
            return JointTraining(**common), self.train_rows
        prefix, cls = ("replay", Replay) if name.startswith("replay") else ("gdumb", GDumb)
        size = name[len(prefix):]
        mem = max(1, min(filial_rows if size == "_filial" else int(size), self.train_rows))
        return cls(mem_size=mem, **common), mem

    def run(self, task: Task) -> BaselineRun:
        name, epochs, seed, filial_rows = task.name, task.epochs, task.seed, task.filial_rows
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


# --- many runs: where they run does not change what they measure ----------------------------------------
class InlinePool:
    """``--jobs 1``: each run in this process as it is submitted, one after another (and a worker's runs).
    The :class:`Baselines` of each spec are built once (each dataset loaded once)."""

    def __init__(self, datasets: dict[str, Any] | None = None) -> None:
        self.datasets = dict(datasets or {})
        self.zoos: dict[Spec, Baselines] = {}

    def run(self, task: Task) -> BaselineRun:
        spec = task.spec
        if spec not in self.zoos:
            if spec.dataset is not None and spec.dataset not in self.datasets:
                from tools.datasets import load_dataset

                self.datasets[spec.dataset] = load_dataset(spec.dataset)
            self.zoos[spec] = Baselines(spec, build_stream(spec.stream, self.datasets.get(spec.dataset),
                                                           spec.rows_per_slice))
        return self.zoos[spec].run(task)

    def submit(self, task: Task) -> "Future[BaselineRun]":
        future: Future = Future()
        try:
            future.set_result(self.run(task))
        except Exception as exc:  # raised where the result is read, as from a worker
            future.set_exception(exc)
        return future

    def close(self, interrupted: bool = False) -> None:
        pass


class WorkerPool:
    """``jobs`` worker processes, each fed by a thread here from one queue, longest task first. A worker
    that dies fails the task it had and every task its thread takes after (an error, never a hang)."""

    def __init__(self, jobs: int) -> None:
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.cl_baselines", "--worker"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)  # a Ctrl-C is the bench's to handle
                      for _ in range(max(1, jobs))]
        for proc in self.procs:
            threading.Thread(target=self._feed, args=(proc,), name=f"cl-worker-{proc.pid}", daemon=True).start()

    def submit(self, task: Task) -> "Future[BaselineRun]":
        future: Future = Future()
        self.queue.put((-task.cost(), next(self.order), task, future))
        return future

    def _feed(self, proc: subprocess.Popen) -> None:
        while (item := self.queue.get())[2] is not None:
            task, future = item[2], item[3]
            try:
                future.set_result(self._ask(proc, task))
            except Exception as exc:  # raised where the result is read
                future.set_exception(exc)

    @staticmethod
    def _ask(proc: subprocess.Popen, task: Task) -> BaselineRun:
        line = ""
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.write(json.dumps(asdict(task)) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"baseline worker {proc.pid} gave no result (status {proc.poll()}) for {task.name} "
                               f"on {task.spec.stream} at {task.epochs} epochs, seed {task.seed}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"baseline worker {proc.pid}: {reply['error']}")
        return BaselineRun(**reply["run"])

    def close(self, interrupted: bool = False) -> None:
        """Let the workers finish (their input ends); interrupted, drop the queued runs, give the workers
        5 s and kill them (our own children, by their handles)."""
        with contextlib.suppress(queue.Empty):  # the feeding threads may take the last ones meanwhile
            while interrupted:
                self.queue.get_nowait()
        for _ in self.procs:
            self.queue.put((math.inf, next(self.order), None, None))
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()) if interrupted else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def pool(jobs: int, datasets: dict[str, Any] | None = None) -> Iterator[InlinePool | WorkerPool]:
    """Runs in this process (``jobs`` <= 1; ``datasets`` already loaded are reused) or in ``jobs`` workers."""
    runner = InlinePool(datasets) if jobs <= 1 else WorkerPool(jobs)
    try:
        yield runner
    except BaseException:
        runner.close(interrupted=True)
        raise
    runner.close()


class Plan:
    """One stream and contender on a pool: the first seed at every epochs setting, then, as soon as
    those are in, the other seeds at the best (the best average accuracy; ties: the earlier setting)."""

    def __init__(self, runner: InlinePool | WorkerPool, task: Task, seeds: list[int], epochs: list[int],
                 log: Callable[[Task, "Future[BaselineRun]"], None] = lambda t, f: None) -> None:
        self.runner, self.task, self.seeds, self.epochs, self.log = runner, task, seeds, epochs, log
        self.rest: Future = Future()
        self._left, self._lock = len(epochs), threading.Lock()
        self.first = {e: self._submit(replace(task, epochs=e, seed=seeds[0])) for e in epochs}
        for future in self.first.values():
            future.add_done_callback(self._first_done)

    def _submit(self, task: Task) -> "Future[BaselineRun]":
        future = self.runner.submit(task)
        future.add_done_callback(lambda f: self.log(task, f))
        return future

    def _first_done(self, _: Future) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        try:
            best = self.best()
        except Exception as exc:  # a first-seed run failed: so does the plan
            self.rest.set_exception(exc)
            return
        self.rest.set_result([self._submit(replace(self.task, epochs=best, seed=s)) for s in self.seeds[1:]])

    def best(self) -> int:
        return max(self.epochs, key=lambda e: avg_acc(self.first[e].result().matrix))

    def runs(self) -> list[BaselineRun]:
        """Every seed's run at the best setting (waits for them)."""
        return [self.first[self.best()].result(), *(f.result() for f in self.rest.result())]


def worker(tasks: Iterable[str], out: TextIO) -> None:
    """A worker process: one JSON task a line in, one JSON reply a line out, until its input ends."""
    torch.set_num_threads(1)
    runner = InlinePool()
    for line in tasks:
        try:
            fields = json.loads(line)
            reply = {"run": asdict(runner.run(Task(spec=Spec(**fields.pop("spec")), **fields)))}
        except Exception:  # reported to the bench, which raises it where the result is read
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else written to stdout goes to stderr
    sys.stdout = sys.stderr
    worker(sys.stdin, results)
