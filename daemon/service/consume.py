"""The consume loop: Kafka records in, one at a time, through the ledger, the decoder and the engine.

Per record: decode (a malformed one, or one the served model cannot take, ``incompatible``, goes
to the dead-letter topic with its reason, and its offset advances only once the broker
acknowledged the dead letter: while the broker is away the loop retries that message and nothing
moves past it); skip it if the ledger says it was applied (a replay); otherwise the engine applies
it, the ledger records it, and the result is logged and counted. Between polls: the checkpoint
cadence and the lag gauge.

No single message stops the loop (docs/architecture.md, "Poison batches"):
- a batch the engine raises on is undone (``Engine.process`` is all or nothing), retried once,
  then dead-lettered as ``engine_error`` with the exception;
- before the engine takes a batch, the in-flight marker in Redis names it; a batch that was in
  flight at ``ops.crash_loop_after`` consecutive crashes of the process is dead-lettered as
  ``crash_loop`` without being applied again;
- the health state knows the message in hand and since when, so a loop stuck on one message
  fails ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis
from kafka.errors import KafkaError

from consumers.batch_consumer import BatchConsumer, record_batch_id
from consumers.dead_letter import DeadLetterProducer
from consumers.ledger import AppliedLedger
from consumers.wire import Batch, BatchSource, DecodeError, Expected, WireLimits, decode_batch
from daemon.engine.engine import Engine
from daemon.engine.records import BatchResult
from daemon.service.checkpointer import Checkpointer
from daemon.service.failpoints import Failpoints
from daemon.service.health import HealthState
from daemon.service.metrics import ServiceMetrics
from zoo_store.checkpoints import DeadLetterLog, InFlightMarker
from zoo_store.connection import CappedBackoff

log = logging.getLogger("filial.service")


class ConsumeLoop:
    def __init__(self, engine: Engine, ledger: AppliedLedger, checkpointer: Checkpointer, limits: WireLimits, *,
                 metrics: ServiceMetrics, health: HealthState, failpoints: Failpoints, backoff_cap: float,
                 stop_event: threading.Event, record: Callable[[dict[str, Any]], None],
                 after_batch: Callable[[BatchResult], None], inflight: InFlightMarker | None = None,
                 before_batch: Callable[[Batch], None] | None = None,
                 on_idle: Callable[[], None] | None = None,
                 crash_loop_after: int = 2, dead_letter_log: DeadLetterLog | None = None) -> None:
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
        self.before_batch = before_batch  # the service: a slice taken over from another learner
        self.on_idle = on_idle            # the service, after a poll with nothing to do: a waiting bootstrap
        self.idle = threading.Event()   # set while the consumer has nothing to do
        self.dead_lettered = 0
        self.inflight = inflight            # None: no crash-loop protection (tests of other parts)
        self.crash_loop_after = crash_loop_after
        self.dead_letter_log = dead_letter_log  # None: a dead letter re-read after a crash is sent again
        self._crashed_on: tuple[str, int] | None = None  # (source, consecutive crashes) from the marker
        self._sent_before: set[str] = set()  # dead letters of earlier lives no checkpoint covers
        self._expected_conflict_logged = False
        self._next_lag_at = 0.0
        self.metrics.pending_age.set_function(self.health.pending_age)

    def run(self, consumer: BatchConsumer, dead_letters: DeadLetterProducer) -> None:
        self._read_crash_marker()
        self._sent_before = self._sent_by_earlier_lives(dead_letters)
        while not self.stop_event.is_set():
            self.health.tick()
            handled = 0
            try:
                started = time.perf_counter()
                records = list(consumer.poll(timeout_ms=500))
                if records:  # an empty poll is waiting, not work
                    self.metrics.stage_seconds.labels("poll").observe(time.perf_counter() - started)
                    self.health.fetched(time.monotonic())  # the records of one poll were fetched together
                for record in records:
                    self.handle(record, dead_letters)
                    handled += 1
                    if self.stop_event.is_set():
                        break
            except KafkaError as exc:  # the client reconnects by itself; say so and go on
                log.warning("poll failed (%s); the consumer reconnects with backoff", exc)
                self.stop_event.wait(1.0)
            finally:
                self.health.fetched(None)
            if handled:
                self.idle.clear()
            else:
                self.idle.set()
                if self.on_idle is not None:
                    self.on_idle()
            started = time.perf_counter()
            if self.checkpointer.maybe_save(force=False):
                self.metrics.stage_seconds.labels("checkpoint").observe(time.perf_counter() - started)
            self._update_lag(consumer)

    def handle(self, record, dead_letters: DeadLetterProducer) -> None:
        source = BatchSource(record.topic, record.partition, record.offset)
        where = f"{record.topic}:{record.partition}:{record.offset}"
        self.health.holding(where, "decoding")
        try:
            self._handle(record, dead_letters, source, where)
        finally:
            self.health.released()

    def _handle(self, record, dead_letters: DeadLetterProducer, source: BatchSource, where: str) -> None:
        if where in self._sent_before:  # dead-lettered, then a crash came before a checkpoint covered it
            log.info("%s was dead-lettered before the restart; not again", where)
            self._sent_before.discard(where)
            self._passed(record, source)
            return
        started = time.perf_counter()
        try:
            batch = decode_batch(record.value, record.headers, self.limits, expected=self._expected(), source=source)
        except DecodeError as exc:
            self._dead_letter(record, exc, dead_letters, source)
            return
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        if self.ledger.already_applied(source, batch.batch_id):
            self.engine.count_duplicate()
            result = BatchResult(batch.slice, len(batch), "skip", "already applied (replayed batch)", None, None, False)
        else:
            crashes = self._crashed_on[1] if self._crashed_on and self._crashed_on[0] == where else 0
            if crashes >= self.crash_loop_after:
                self._dead_letter(record, DecodeError("crash_loop", f"the process died {crashes} consecutive times "
                                                      "while applying this batch; not applied again"),
                                  dead_letters, source)
                self._crashed_on = None
                self._clear_marker()
                return
            result = self._apply(batch, where, crashes)
            if crashes:  # the culprit got through this process (applied or quarantined): the loop is broken
                self._crashed_on = None
            if isinstance(result, DecodeError):  # quarantined
                self._dead_letter(record, result, dead_letters, source)
                self._clear_marker()
                return
            self._clear_marker()
        self.ledger.mark_applied(source, batch.batch_id)
        self.checkpointer.note_batch()
        self._log(result)
        self.after_batch(result)

    def _apply(self, batch: Batch, where: str, crashes: int) -> BatchResult | DecodeError:
        """The engine applies ``batch``; one retry after an error (each failure is undone by the engine);
        after the second, the ``engine_error`` to dead-letter it with."""
        self._mark(where, crashes)
        if self.before_batch is not None:
            self.before_batch(batch)
        for attempt in (1, 2):
            self.health.holding(where, f"applying (attempt {attempt})")
            try:
                with self.failpoints.phase("train"):
                    self.failpoints.applying(batch.slice)
                    return self.engine.process(batch)
            except Exception as exc:  # any error of the learner: the batch must not stop the service
                self.metrics.engine_errors.inc()
                detail = f"{type(exc).__name__}: {exc}"
                log.warning("engine error on %s (attempt %d of 2, state undone): %s", where, attempt, detail)
                error = DecodeError("engine_error", detail)
        return error

    # --- crash loops: the in-flight marker ------------------------------------------------------------
    def _read_crash_marker(self) -> None:
        if self.inflight is None:
            return
        try:
            marker = self.inflight.read()
        except redis.RedisError as exc:
            log.warning("in-flight marker not read (%s): crash-loop protection starts with the next batch", exc)
            return
        if marker is not None:
            self._crashed_on = (marker.source, marker.crashes + 1)
            log.warning("the process died while applying %s (%d consecutive crash(es)); at %d it is dead-lettered "
                        "as crash_loop", marker.source, marker.crashes + 1, self.crash_loop_after)

    def _mark(self, where: str, crashes: int) -> None:
        if self.inflight is None or not self.health.available("redis"):
            return  # Redis away: a crash now is not recognised as a loop (each restart waits for Redis anyway)
        try:
            self.inflight.mark(where, crashes)
        except redis.RedisError as exc:
            log.debug("in-flight marker not written: %s", exc)

    def _clear_marker(self) -> None:
        if self.inflight is None or not self.health.available("redis"):
            return
        try:
            self.inflight.clear()
        except redis.RedisError as exc:
            log.debug("in-flight marker not cleared: %s", exc)

    def _expected(self) -> Expected:
        """What the served model takes: the model's own data_type and row shape once it exists, else the
        settings' declaration (unset fields: the first batch decides)."""
        served = self.engine.expected_shapes()
        declared = Expected(self.limits.data_type, self.limits.row_shape)
        if not served:
            return declared
        (data_type, row_shape), = served.items()
        if not self._expected_conflict_logged and (declared.data_type not in (None, data_type)
                                                   or declared.row_shape not in (None, row_shape)):
            self._expected_conflict_logged = True
            log.error("settings declare data_type %s rows %s but the served model takes %s rows %s: the model "
                      "wins (batches it cannot take are dead-lettered as incompatible)", declared.data_type,
                      declared.row_shape, data_type, row_shape)
        return Expected(data_type, row_shape)

    def _sent_by_earlier_lives(self, dead_letters: DeadLetterProducer) -> set[str]:
        """The dead letters earlier lives sent that no checkpoint covers: those they recorded, and those
        whose send a crash interrupted that the dead-letter topic holds (the others are sent again)."""
        sent = self._redis(lambda log_: log_.sources(), default=set())
        unsure = {source: at for source, at in self._redis(lambda log_: log_.unsure(), default={}).items()
                  if source not in sent}
        if not unsure:
            return sent
        try:
            delivered = dead_letters.delivered(unsure)
        except KafkaError as exc:
            log.warning("could not read the dead-letter topic back (%s): %d dead letter(s) a crash interrupted "
                        "will be sent again, perhaps twice", exc, len(unsure))
            return sent
        for source in delivered:
            self._redis(lambda log_: log_.record(source, "delivered before a crash"), default=None)
        log.info("dead letters whose send a crash interrupted: %d delivered then (not sent again), %d not (sent "
                 "again)", len(delivered), len(unsure) - len(delivered))
        return sent | delivered

    def _dead_letter(self, record, exc: DecodeError, dead_letters: DeadLetterProducer, source: BatchSource) -> None:
        where = f"{record.topic}:{record.partition}:{record.offset}"
        log.warning("dead-letter %s: %s", where, exc)
        self.health.holding(where, f"dead-lettering ({exc.reason})")
        self._redis(lambda log_: log_.sending(where, int(time.time() * 1000)), default=None)
        if not self._send_dead_letter(record, exc, dead_letters, where):
            return  # stopping, not acknowledged: the offset stays, it is re-read after restart
        self._redis(lambda log_: log_.record(where, exc.reason), default=None)
        self.metrics.decode_failures.labels(exc.reason).inc()
        self._passed(record, source)
        self.dead_lettered += 1

    def _passed(self, record, source: BatchSource) -> None:
        """A dead-lettered record's offset moves on through the next checkpoint like an applied one's."""
        self.ledger.mark_dead_lettered(source, record_batch_id(record))
        self.checkpointer.note_batch()

    def checkpointed(self, applied_offsets: dict[str, int]) -> None:
        """A checkpoint covers everything below ``applied_offsets``: its dead letters need no record."""
        self._redis(lambda log_: log_.trim(applied_offsets), default=None)

    def _redis(self, call: Callable[[DeadLetterLog], Any], default: Any) -> Any:
        if self.dead_letter_log is None or not self.health.available("redis"):
            return default  # Redis away: at worst a message re-read after a crash is dead-lettered twice
        try:
            return call(self.dead_letter_log)
        except redis.RedisError as exc:
            log.debug("dead-letter log not reached: %s", exc)
            return default

    def _send_dead_letter(self, record, exc: DecodeError, dead_letters: DeadLetterProducer, where: str) -> bool:
        backoff = CappedBackoff(base=0.5, cap=self.backoff_cap)
        while True:
            try:
                dead_letters.send(record.value, record.headers, exc.reason, exc.detail, where)
                return True
            except KafkaError as err:
                if self.stop_event.is_set():
                    return False
                wait = backoff.failed()
                log.warning("dead-letter topic unreachable (%s); retrying %s in %.1fs", err, where, wait)
                self.health.holding(where, f"dead-lettering ({exc.reason}): the dead-letter topic refuses it: {err}")
                backoff.sleep(self.stop_event)

    def _log(self, r: BatchResult) -> None:
        kl = f"{r.kl:.3f}" if r.kl is not None else "-"
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None and r.accuracy == r.accuracy else "-"
        target = f" -> {r.child}" if r.child else ""
        log.info("batch slice=%s rows=%d kl=%s acc=%s decision=%s%s (%s) %.2fs", r.slice, r.rows, kl, acc,
                 r.action, target, r.reason, r.seconds)
        m = self.metrics
        m.stages(r.stages)
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
