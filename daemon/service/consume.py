"""The consume loop: Kafka records in, one at a time, through the ledger, the decoder and the engine.

Per record: decode (a malformed one goes to the dead-letter topic with its reason, and its
offset advances only once the broker acknowledged the dead letter: while the broker is away the
loop retries that message and nothing moves past it); skip it if the ledger says it was applied
(a replay); otherwise the engine applies it, the ledger records it, and the result is logged and
counted. Between polls: the checkpoint cadence and the lag gauge.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from kafka.errors import KafkaError

from consumers.batch_consumer import BatchConsumer
from consumers.dead_letter import DeadLetterProducer
from consumers.ledger import AppliedLedger
from consumers.wire import BatchSource, DecodeError, WireLimits, decode_batch
from daemon.engine.engine import Engine
from daemon.engine.records import BatchResult
from daemon.service.checkpointer import Checkpointer
from daemon.service.failpoints import Failpoints
from daemon.service.health import HealthState
from daemon.service.metrics import ServiceMetrics
from zoo_store.connection import CappedBackoff

log = logging.getLogger("filial.service")


class ConsumeLoop:
    def __init__(self, engine: Engine, ledger: AppliedLedger, checkpointer: Checkpointer, limits: WireLimits, *,
                 metrics: ServiceMetrics, health: HealthState, failpoints: Failpoints, backoff_cap: float,
                 stop_event: threading.Event, record: Callable[[dict[str, Any]], None],
                 after_batch: Callable[[BatchResult], None]) -> None:
        self.engine = engine
        self.ledger = ledger
        self.checkpointer = checkpointer
        self.limits = limits
        self.metrics = metrics
        self.health = health
        self.failpoints = failpoints
        self.backoff_cap = backoff_cap
        self.stop_event = stop_event
        self.record = record            # telemetry of each decision
        self.after_batch = after_batch  # the service: bootstrap publish, merge nudge, user callback
        self.idle = threading.Event()   # set while the consumer has nothing to do
        self.dead_lettered = 0
        self._next_lag_at = 0.0

    def run(self, consumer: BatchConsumer, dead_letters: DeadLetterProducer) -> None:
        while not self.stop_event.is_set():
            self.health.tick()
            handled = 0
            try:
                for record in consumer.poll(timeout_ms=500):
                    self.handle(record, dead_letters)
                    handled += 1
                    if self.stop_event.is_set():
                        break
            except KafkaError as exc:  # the client reconnects by itself; say so and go on
                log.warning("poll failed (%s); the consumer reconnects with backoff", exc)
                self.stop_event.wait(1.0)
            if handled:
                self.idle.clear()
            else:
                self.idle.set()
            self.checkpointer.maybe_save(force=False)
            self._update_lag(consumer)

    def handle(self, record, dead_letters: DeadLetterProducer) -> None:
        source = BatchSource(record.topic, record.partition, record.offset)
        try:
            batch = decode_batch(record.value, record.headers, self.limits,
                                 expected_shape=self.engine.expected_shapes(), source=source)
        except DecodeError as exc:
            self._dead_letter(record, exc, dead_letters, source)
            return
        if self.ledger.already_applied(source, batch.batch_id):
            self.engine.count_duplicate()
            result = BatchResult(batch.slice, len(batch), "skip", "already applied (replayed batch)", None, None, False)
        else:
            with self.failpoints.phase("train"):
                result = self.engine.process(batch)
        self.ledger.mark_applied(source, batch.batch_id)
        self.checkpointer.note_batch()
        self._log(result)
        self.after_batch(result)

    def _dead_letter(self, record, exc: DecodeError, dead_letters: DeadLetterProducer, source: BatchSource) -> None:
        where = f"{record.topic}:{record.partition}:{record.offset}"
        log.warning("dead-letter %s: %s", where, exc)
        backoff = CappedBackoff(base=0.5, cap=self.backoff_cap)
        while True:
            try:
                dead_letters.send(record.value, record.headers, exc.reason, exc.detail, where)
                break
            except KafkaError as err:
                if self.stop_event.is_set():  # not acknowledged: leave the offset, it is re-read after restart
                    return
                wait = backoff.failed()
                log.warning("dead-letter topic unreachable (%s); retrying %s in %.1fs", err, where, wait)
                backoff.sleep(self.stop_event)
        self.metrics.decode_failures.labels(exc.reason).inc()
        self.ledger.mark_applied(source, None)
        self.dead_lettered += 1
        self.checkpointer.note_batch()

    def _log(self, r: BatchResult) -> None:
        kl = f"{r.kl:.3f}" if r.kl is not None else "-"
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None and r.accuracy == r.accuracy else "-"
        target = f" -> {r.child}" if r.child else ""
        log.info("batch slice=%s rows=%d kl=%s acc=%s decision=%s%s (%s) %.2fs", r.slice, r.rows, kl, acc,
                 r.action, target, r.reason, r.seconds)
        m = self.metrics
        m.decisions.labels(r.action).inc()
        if r.action == "skip":
            m.duplicates.inc()
        else:
            m.batches.labels(r.slice).inc()
            m.samples.labels(r.slice).inc(r.rows)
        if r.kl is not None:
            m.kl.labels(r.slice).set(r.kl)
        status = self.engine.status()
        preq = status.prequential_accuracy.get(r.slice)
        if preq is not None:
            m.prequential.labels(r.slice).set(preq)
        for name in ("active", "retired"):
            m.children.labels(name).set(status.children.get(name, 0))
        self.record(r.record())

    def _update_lag(self, consumer: BatchConsumer) -> None:
        if time.monotonic() < self._next_lag_at:
            return
        self._next_lag_at = time.monotonic() + 5.0
        try:
            for partition, lag in consumer.lag().items():
                self.metrics.lag.labels(partition).set(lag)
        except KafkaError as exc:
            log.debug("lag not measured: %s", exc)
