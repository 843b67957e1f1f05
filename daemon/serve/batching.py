"""Micro-batching: concurrent requests share one model call.

A request's rows join a queue. The worker takes the oldest request and waits until ``max_wait_ms``
after it arrived (or until ``max_batch_rows`` rows of its kind are queued), then runs every queued
request of the same kind — the same mode, dtype and row shape, so nothing is converted or padded —
in one call of the predictor, and splits the result back by rows. While a call runs, new requests
queue up and go together in the next one, so under load batches grow with no added wait; alone, a
request waits at most ``max_wait_ms``. The default wait is 0: on 2 CPU cores and the default CNN,
2 ms of waiting raised the p50 of a lone client from 4 to 8 ms and bought no throughput with 8 or 64
clients (``filial bench serve --max-wait-ms``); a GPU's larger calls may repay a wait.

The model runs in one worker thread, never on the event loop: ``/healthz`` and the queueing stay
responsive while a call computes, and one call at a time uses every core torch is given. A call
that raises on a merged batch is retried request by request, so a request that cannot be served
fails alone instead of failing its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

Predict = Callable[[torch.Tensor, "str | None"], Any]
Split = Callable[[Any, Sequence[int]], list[Any]]      # one result -> one per request, by row counts
OnBatch = Callable[[int, int, float], None]            # (requests, rows, seconds) of each model call


class BatcherClosed(RuntimeError):
    """The server is stopping: the request was not run."""


@dataclass(eq=False)
class _Request:
    x: torch.Tensor
    mode: str | None
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> Hashable:
        return self.mode, self.x.dtype, tuple(self.x.shape[1:])


class MicroBatcher:
    def __init__(self, predict: Predict, split: Split, max_batch_rows: int = 256, max_wait_ms: float = 0.0,
                 on_batch: OnBatch | None = None) -> None:
        self.predict_fn = predict
        self.split = split
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: list[_Request] = []
        self._running: list[_Request] = []  # the batch in the worker thread now
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="filial-serve-model")
        self._task: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="filial-serve-batcher")

    async def stop(self) -> None:
        """Refuse new requests, finish the call in progress, fail what is still queued."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request in self._queue + self._running:
            if not request.future.done():
                request.future.set_exception(BatcherClosed("the server is stopping"))
        self._queue.clear()
        self._running = []
        self._pool.shutdown(wait=True)

    async def predict(self, x: torch.Tensor, mode: str | None = None) -> Any:
        """The prediction for ``x`` (rows of one request), run with whatever requests queue beside it."""
        if self._closed:
            raise BatcherClosed("the server is stopping")
        request = _Request(x, mode, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._wake.set()
        return await request.future

    def _rows(self, kind: Hashable) -> int:
        return sum(len(r.x) for r in self._queue if r.kind == kind)

    def _take(self, kind: Hashable) -> list[_Request]:
        """The queued requests of ``kind``, oldest first, up to max_batch_rows (the oldest always)."""
        batch, rows = [], 0
        for request in self._queue:
            if request.kind == kind and (not batch or rows + len(request.x) <= self.max_batch_rows):
                batch.append(request)
                rows += len(request.x)
        self._queue = [r for r in self._queue if r not in batch]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._queue = [r for r in self._queue if not r.future.done()]  # clients that went away
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._queue[0]
            while self._rows(first.kind) < self.max_batch_rows:
                remaining = first.arrived + self.max_wait - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._running = self._take(first.kind)
            outcomes = await loop.run_in_executor(self._pool, self._call, batch)
            self._running = []
            for request, outcome in zip(batch, outcomes):
                if request.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    def _call(self, batch: list[_Request]) -> list[Any]:
        """In the worker thread: one predictor call for the batch; request by request if it raises."""
        started = time.perf_counter()
        sizes = [len(r.x) for r in batch]
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([r.x for r in batch])
            outcomes = self.split(self.predict_fn(x, batch[0].mode), sizes)
        except Exception as exc:  # noqa: BLE001 - handed to the request(s), which answer with it
            if len(batch) > 1:
                return [self._call([r])[0] for r in batch]  # each single call counts itself
            outcomes = [exc]
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(sizes), time.perf_counter() - started)
        return outcomes
