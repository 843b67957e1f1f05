"""Two independent computations at once, on a CPU core torch's thread pool leaves free.

A batch's observation runs two forward passes of different models over the same rows: the learning
served model's (prequential accuracy) and the published version's (the KL, supersession, confirmation).
Neither reads what the other writes, so when the CPU has a core torch's intra-op pool does not use
(``torch.get_num_threads()`` below the cores this process may run on), the second runs in a worker
thread while the first runs in the caller's: the batch waits for the longer of the two instead of their
sum (measured: two 100-row passes of the default CNN, one torch thread each, 19.8 → 10.0 ms on 2 cores).
Where torch already uses every core, or the device is a GPU (whose queue overlaps them anyway), the two
run one after the other: a second thread would only contend for the same cores.

Results are the same either way (a forward pass computes the same numbers in any thread), so a seeded run
stays bit-identical. The worker is one thread, started on first use, with the caller's torch thread count.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Overlap:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: ThreadPoolExecutor | None = None

    def available(self) -> bool:
        """Whether a second computation would find a core of its own now (checked per call: the
        process's torch thread count can change after the engine is built)."""
        return self.device.type == "cpu" and torch.get_num_threads() < usable_cores()

    def both(self, first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
        """``(first(), second())``, the two at once where :meth:`available`, else one after the other.
        An exception from either propagates, once both have finished."""
        if not self.available():
            return first(), second()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filial-overlap")
        pending: Future[B] = self._pool.submit(_with_threads, second, torch.get_num_threads())
        try:
            a = first()
        finally:
            wait([pending])  # even when ``first`` raised: nothing outlives the call
        return a, pending.result()


def _with_threads(call: Callable[[], B], threads: int) -> B:
    # torch's intra-op thread count is per thread under OpenMP: the worker takes the caller's
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return call()
