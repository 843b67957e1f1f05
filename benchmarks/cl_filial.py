"""filial through its real path for ``filial bench cl``: producer → embedded Kafka-protocol broker →
``Service`` (consume loop, engine, merge job, publisher) → embedded Redis → a follower.

The bench produces one batch (wire codec, ``consumers.wire.encode_batch``) and waits until the daemon
has applied it and any merge it made due has been gated and published (lock-step: each version can
be placed at a batch). Merges are due by count (``merge_after_child_updates``; ``merge_trigger=count``
where the service has it, otherwise the merge job is nudged and its clock set to a day). After the
last batch of every experience the bench calls ``service.merge_now()`` so the served model can catch
up, waits until the follower has received the newest version, and evaluates that version on every
slice's test rows: one row of the accuracy matrix. Every version the follower receives is also
evaluated on every slice when it arrives, for *time to serve*; the daemon's per-batch drift flag
(``BatchResult.drift``) gives *drift delay*.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.cl_baselines import StepCounter
from benchmarks.cl_metrics import drift_delay, time_to_serve
from benchmarks.cl_streams import Stream, batches
from consumers.connection import KafkaConnection
from consumers.wire import encode_batch
from daemon.engine.records import BatchResult
from daemon.learn.models import Architecture
from daemon.learn.training import accuracy, model_input
from daemon.service.embedded import EmbeddedKafka
from daemon.service.service import Service
from daemon.service.settings import FLAT_NAMES, Settings, load_settings
from zoo_store.connection import connect
from zoo_store.follow import Follower

log = logging.getLogger("filial.bench.cl")

WAIT_SECONDS = 300.0  # longest wait for one batch (training and a merge included) on a slow machine


@dataclass
class FilialRun:
    matrix: list[list[float]]
    order: list[int]
    seconds: float
    optimizer_steps: int
    stored_rows: int
    batches: int
    versions: int
    counters: dict[str, int]
    time_to_serve: dict[str, int | None]
    drift_delay: dict[str, int | None]
    served: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)  # (batch, version, accs)


def filial_settings(kafka: str, redis_url: str, tag: str, stream: Stream, *, seed: int, merge_every: int,
                    device: str, overrides: dict[str, Any] | None = None) -> Settings:
    """Default settings but the servers, names unique to this run, the stream's classes, the seed and a
    merge due every ``merge_every`` updates (by count, never by the clock)."""
    flat: dict[str, Any] = dict(
        kafka_bootstrap=kafka, redis_url=redis_url, topic=f"{tag}.in", dead_letter_topic=f"{tag}.dlq",
        group_id=tag, redis_prefix=tag, kafka_session_timeout_ms=6000, health_port=-1,
        merge_interval_seconds=86_400, merge_after_child_updates=merge_every, num_classes=stream.num_classes,
        device=device)
    if "seed" in FLAT_NAMES:
        flat["seed"] = seed
    if "merge_trigger" in FLAT_NAMES:
        flat["merge_trigger"] = "count"
    flat.update(overrides or {})
    return load_settings(**flat)


def stored_rows(settings: Settings, stream: Stream, batch_size: int, total_batches: int | None = None) -> int:
    """Rows filial keeps at the end of ``stream`` (replay plus held-out buffers), from its settings: each
    batch of n rows gives ``max(1, round(n * heldout_fraction))`` to the held-out buffer."""
    learner = settings.learner
    held: dict[int, int] = {}
    train: dict[int, int] = {}
    for j in stream.order:
        s = stream.slices[j]
        for xb, _ in batches(s.x_train, s.y_train, batch_size, total_batches):
            n = len(xb)
            h = max(1, int(round(n * learner.heldout_fraction))) if n > 1 else 0
            held[j] = held.get(j, 0) + h
            train[j] = train.get(j, 0) + n - h
    return sum(min(learner.heldout_per_slice, h) for h in held.values()) + \
        sum(min(learner.replay_per_slice, t) for t in train.values())


class _Follower(threading.Thread):
    """A downstream consumer (as ``filial watch``): every version it receives is loaded (sha256
    verified) into its architecture; it keeps the newest."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="cl-follower", daemon=True)
        self.follower = Follower(connect(settings.redis.url), line=settings.publish.line, prefix=settings.redis.prefix)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.version: int | None = None
        self.model: torch.nn.Module | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for event in self.follower.events(from_version=1, block_ms=100, stop=self.stop_event):
                manifest, state = self.follower.load(event.version)
                model = Architecture.model_validate(manifest.architecture).build()
                model.load_state_dict(state)
                model.eval()
                with self.lock:
                    self.version, self.model = event.version, model
        except Exception as exc:  # reported by the bench
            self.error = exc

    def latest(self) -> tuple[int | None, torch.nn.Module | None]:
        with self.lock:
            return self.version, self.model

    def wait_for(self, version: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.version or 0) < version:
            if self.error is not None:
                raise RuntimeError(f"the follower failed: {self.error}") from self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the follower did not receive v{version} within {timeout:.0f}s")
            time.sleep(0.02)


class FilialRunner:
    """One stream through the service, in lock-step with the producer."""

    def __init__(self, stream: Stream, settings: Settings, *, batch_size: int,
                 total_batches: int | None = None, progress=None) -> None:
        self.stream, self.s, self.batch_size, self.total_batches = stream, settings, batch_size, total_batches
        self.progress = progress or (lambda msg: None)
        self.tests = [(model_input(s.x_test, stream.data_type), s.y_test) for s in stream.slices]
        self.results: list[BatchResult] = []
        self.daemon_error: BaseException | None = None
        self.cond = threading.Condition()

    def _serve(self, service: Service) -> None:
        try:
            service.run()
        except BaseException as exc:  # the bench reports it; the thread's traceback goes to stderr
            self.daemon_error = exc
            raise

    def _on_result(self, result: BatchResult) -> None:
        with self.cond:
            self.results.append(result)
            self.cond.notify_all()

    def evaluate(self, model: torch.nn.Module | None) -> list[float]:
        if model is None:  # nothing published yet: followers have no model
            return [0.0] * len(self.tests)
        return [accuracy(model, x, y) for x, y in self.tests]

    def _wait_result(self, count: int, loop: threading.Thread) -> BatchResult:
        deadline = time.monotonic() + WAIT_SECONDS
        with self.cond:
            while len(self.results) < count:
                if not loop.is_alive():
                    why = self.daemon_error
                    raise RuntimeError("the daemon stopped while the bench was streaming" + (
                        f" ({type(why).__name__}: {' '.join(str(why).split())[:300]})" if why else ""))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the daemon did not apply batch {count} within {WAIT_SECONDS:.0f}s")
                self.cond.wait(0.1)
            return self.results[count - 1]

    @staticmethod
    def _merges(service: Service) -> int:
        c = service.engine.counters
        return c.merges_accepted + c.merges_rejected

    def _settle(self, service: Service, merges_before: int, result: BatchResult) -> None:
        """Wait until a merge the batch made due has been gated and, if accepted, published."""
        lock = getattr(service.merge_job, "_lock", None)

        def merging() -> bool:
            return lock is not None and lock.locked()

        started = time.monotonic()
        while time.monotonic() - started < WAIT_SECONDS:
            if not merging():
                if self._merges(service) > merges_before or not getattr(result, "merge_due", False):
                    return
                if time.monotonic() - started > 3.0:  # due, but the merge job found nothing to merge
                    return
            time.sleep(0.02)

    def run(self, kafka: EmbeddedKafka, seed: int) -> FilialRun:
        from kafka import KafkaProducer

        stream, s = self.stream, self.s
        kafka.create_topics({s.kafka.topic: 1, s.kafka.dead_letter_topic: 1})
        torch.manual_seed(seed)  # for a learner that seeds nothing itself
        service = Service(s, on_result=self._on_result)
        loop = threading.Thread(target=self._serve, args=(service,), name="cl-daemon", daemon=True)
        follower = _Follower(s)
        producer = KafkaProducer(acks="all", linger_ms=0, max_request_size=32 * 1024 * 1024,
                                 **KafkaConnection(bootstrap=kafka.address).client_kwargs())
        matrix: list[list[float]] = []
        served: list[tuple[int, int, dict[str, float]]] = []
        first_batch: dict[str, int] = {}
        flags: dict[str, list[bool]] = {}
        position = 0
        have = None
        started = time.perf_counter()
        with StepCounter() as steps:
            loop.start()
            follower.start()
            try:
                for e, j in enumerate(stream.order):
                    sl = stream.slices[j]
                    first = sl.name not in first_batch
                    if first:
                        first_batch[sl.name] = position + 1
                        flags[sl.name] = []
                    for b, (xb, yb) in enumerate(batches(sl.x_train, sl.y_train, self.batch_size,
                                                         self.total_batches, seed)):
                        merges_before = self._merges(service)
                        value, headers = encode_batch(xb, yb, sl.name, stream.data_type, f"{s.kafka.topic}-{e}-{b}")
                        producer.send(s.kafka.topic, value=value, headers=headers).get(timeout=60)
                        position += 1
                        result = self._wait_result(position, loop)
                        self._settle(service, merges_before, result)
                        if first:
                            flags[sl.name].append(bool(result.drift))
                        have = self._received(service, follower, position, have, served)
                    outcome = service.merge_now()
                    have = self._received(service, follower, position, have, served)
                    version, model = follower.latest()
                    matrix.append(self.evaluate(model))
                    verdict = "-" if outcome is None else ("accepted" if outcome.accepted else "rejected")
                    self.progress(f"  filial {stream.name} seed {seed}: experience {e + 1}/{len(stream.order)} "
                                  f"({sl.name}, {position} batches) end merge {verdict}; follower holds "
                                  f"v{version}; row {[round(a, 3) for a in matrix[-1]]}")
            finally:
                service.stop()
                loop.join(timeout=120)
                follower.stop_event.set()
                follower.join(timeout=10)
                producer.close(timeout=10)
        seconds = time.perf_counter() - started
        if follower.error is not None:
            raise RuntimeError(f"the follower failed: {follower.error}") from follower.error
        c = service.engine.counters
        final = dict(zip(stream.columns, matrix[-1]))
        first_slice = stream.slices[stream.order[0]].name
        return FilialRun(
            matrix=matrix, order=list(stream.order), seconds=seconds, optimizer_steps=steps.steps,
            stored_rows=stored_rows(s, stream, self.batch_size, self.total_batches), batches=position,
            versions=len(service.published),
            counters={k: int(v) for k, v in vars(c).items() if isinstance(v, int)},
            time_to_serve=time_to_serve(first_batch, [(g, accs) for g, _, accs in served], final),
            drift_delay={k: v for k, v in drift_delay(flags).items() if k != first_slice},
            served=served)

    def _received(self, service: Service, follower: _Follower, position: int, have: int | None,
                  served: list[tuple[int, int, dict[str, float]]]) -> int | None:
        """Wait for the follower to hold the newest published version; evaluate it if it is new."""
        if service.published:
            follower.wait_for(service.published[-1])
        version, model = follower.latest()
        if version is not None and version != have:
            served.append((position, version, dict(zip(self.stream.columns, self.evaluate(model)))))
        return version
