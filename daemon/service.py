"""The service around the engine: Kafka in, Redis out, merges on a schedule, durable offsets.

Threads: the consume loop (this module's :meth:`Service.run`), the APScheduler merge job, and
nothing else. Invariants kept here (DESIGN.md):

- offsets are committed only after a checkpoint that contains their effect has been saved;
- a dead-lettered message is acknowledged by the broker before its offset can be committed;
- a version is published in one transaction (zoo_store.versions) and retried until it is
  written, with the same publish id, so it is never half-written nor announced twice;
- on stop: the batch in hand finishes, a running merge finishes, a last checkpoint is saved and
  its offsets committed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

import redis
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from safetensors.torch import save as st_save

from consumers.batch_consumer import BatchConsumer
from consumers.connection import KafkaConnection
from consumers.dead_letter import DeadLetterProducer
from consumers.wire import BatchSource, DecodeError, decode_batch
from daemon.engine import BatchResult, Engine, MergeOutcome
from daemon.settings import Settings
from daemon.training import resolve_device
from zoo_store.checkpoints import CheckpointStore
from zoo_store.connection import connect
from zoo_store.keys import Keys
from zoo_store.models import sha256_hex
from zoo_store.telemetry import Telemetry
from zoo_store.versions import VersionStore

log = logging.getLogger("filial.service")


def kafka_connection(s: Settings) -> KafkaConnection:
    return KafkaConnection(bootstrap=s.kafka_bootstrap, security_protocol=s.kafka_security_protocol,
                           sasl_mechanism=s.kafka_sasl_mechanism, sasl_username=s.kafka_sasl_username,
                           sasl_password=s.kafka_sasl_password, ssl_cafile=s.kafka_ssl_cafile,
                           ssl_certfile=s.kafka_ssl_certfile, ssl_keyfile=s.kafka_ssl_keyfile)


def redis_client(s: Settings) -> redis.Redis:
    return connect(s.redis_url, username=s.redis_username,
                   password=s.redis_password.get_secret_value() if s.redis_password else None,
                   ssl_ca_file=str(s.redis_ssl_ca_file) if s.redis_ssl_ca_file else None)


class Service:
    def __init__(self, settings: Settings, on_result: Callable[[BatchResult], None] | None = None) -> None:
        if not settings.kafka_bootstrap or not settings.redis_url:
            raise ValueError("Service needs kafka_bootstrap and redis_url (the CLI starts embedded servers)")
        self.s = settings
        self.engine = Engine(settings, resolve_device(settings.device))
        self.keys = Keys(settings.redis_prefix)
        self.redis = redis_client(settings)
        signing_key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        self.versions = VersionStore(self.redis, self.keys, signing_key, settings.keep_versions)
        self.checkpoints = CheckpointStore(self.redis, self.keys)
        self.telemetry = Telemetry(self.redis, self.keys)
        self.stop_event = threading.Event()
        self.idle = threading.Event()  # set while the consumer has nothing to do
        self.on_result = on_result
        self._last_checkpoint = time.monotonic()
        self._batches_since_checkpoint = 0
        self._state_changed = False  # a publish changed the served version since the last checkpoint
        self._consumer: BatchConsumer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._merge_lock = threading.Lock()
        self.dead_lettered = 0
        self.published: list[int] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def restore(self) -> None:
        saved = self.checkpoints.load()
        if saved is None:
            log.info("no checkpoint: starting a fresh engine")
            return
        meta, tensors = saved
        self.engine.restore(meta, tensors)
        log.info("restored checkpoint seq %s: served v%s, %d batches applied, offsets %s",
                 meta.get("seq"), meta["served_version"], meta["counters"]["batches"], meta["applied_offsets"])

    def run(self) -> None:
        """Consume until :meth:`stop`; returns after the final checkpoint and commit."""
        self.restore()
        conn = kafka_connection(self.s)
        self._consumer = BatchConsumer(conn, self.s.topic, self.s.group_id, self.s.kafka_session_timeout_ms,
                                       max_message_bytes=self.s.limits.max_message_bytes)
        dead_letters = DeadLetterProducer(conn, self.s.dead_letter_topic, self.s.limits.max_message_bytes)
        self._start_scheduler()
        log.info("consuming %s as group %s; publishing to %s (line %s)", self.s.topic, self.s.group_id,
                 self.s.redis_url.split("@")[-1], self.s.line)
        try:
            while not self.stop_event.is_set():
                handled = 0
                for record in self._consumer.poll(timeout_ms=500):
                    self._handle(record, dead_letters)
                    handled += 1
                    if self.stop_event.is_set():
                        break
                if handled:
                    self.idle.clear()
                else:
                    self.idle.set()
                self._maybe_checkpoint(force=False)
        finally:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=True)  # a running merge completes its publish
            self._maybe_checkpoint(force=True)
            dead_letters.close()
            self._consumer.close()
            log.info("stopped: %s", asdict(self.engine.counters))

    def stop(self) -> None:
        self.stop_event.set()

    # --- per message -------------------------------------------------------------------------------
    def _handle(self, record, dead_letters: DeadLetterProducer) -> None:
        source = BatchSource(record.topic, record.partition, record.offset)
        try:
            batch = decode_batch(record.value, record.headers, self.s.limits,
                                 expected_shape=self.engine.expected_shapes(), source=source)
        except DecodeError as exc:
            where = f"{record.topic}:{record.partition}:{record.offset}"
            log.warning("dead-letter %s: %s", where, exc)
            dead_letters.send(record.value, record.headers, exc.reason, exc.detail, where)
            self.engine.note_skipped(source)
            self.dead_lettered += 1
            self._batches_since_checkpoint += 1
            return
        result = self.engine.process(batch)
        self._batches_since_checkpoint += 1
        self._report(result)
        if result.publish_bootstrap:
            version = self._publish(self.engine.served_state(), reason="bootstrap", base_version=None)
            self.engine.adopt_bootstrap(version)
            self._state_changed = True
        if result.merge_due and self._scheduler is not None:
            self._scheduler.modify_job("merge", next_run_time=_now())
        if self.on_result:
            self.on_result(result)

    def _report(self, r: BatchResult) -> None:
        kl = f"{r.kl:.3f}" if r.kl is not None else "-"
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None and r.accuracy == r.accuracy else "-"
        target = f" -> {r.child}" if r.child else ""
        log.info("batch slice=%s rows=%d kl=%s acc=%s decision=%s%s (%s) %.2fs", r.slice, r.rows, kl, acc,
                 r.action, target, r.reason, r.seconds)
        self._best_effort(self.telemetry.decision, r.record())

    def _best_effort(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except redis.RedisError as exc:
            log.warning("telemetry not recorded (%s); ingest continues", exc)

    # --- publishing --------------------------------------------------------------------------------------
    def _publish(self, state, *, reason: str, base_version: int | None,
                 merge: dict[str, Any] | None = None) -> int:
        weights = st_save({k: v.contiguous() for k, v in state.items()})
        engine = self.engine
        with engine.lock:
            root = engine.root
            model = root.architecture.build()
            model.load_state_dict(state)
            model.to(engine.device)
            metrics = engine.metrics(model)
            lineage = [{"node_id": n.node_id, "parent": n.parent, "slice": n.slice, "created_at": n.created_at,
                        "architecture": n.architecture.model_dump()} for n in engine.tree.nodes.values()]
            architecture = root.architecture.model_dump()
            parent_version = engine.served_version
        publish_id = f"{reason}:{parent_version}:{sha256_hex(weights)[:24]}"
        delay = 0.2
        while True:
            try:
                published = self.versions.publish(
                    self.s.line, weights, publish_id=publish_id, reason=reason, architecture=architecture,
                    base_version=base_version, parent_version=parent_version, lineage=lineage,
                    metrics=metrics, merge=merge)
                self._best_effort(self.telemetry.save_tree, engine.tree.describe())
                self.published.append(published.manifest.version)
                return published.manifest.version
            except redis.RedisError as exc:
                log.warning("publish of %s failed (%s); retrying in %.1fs", reason, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # --- merging ----------------------------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        self._scheduler = BackgroundScheduler(daemon=True)
        trigger = (CronTrigger.from_crontab(self.s.merge_cron) if self.s.merge_cron
                   else IntervalTrigger(seconds=self.s.merge_interval_seconds))
        self._scheduler.add_job(self.merge_now, trigger, id="merge", max_instances=1, coalesce=True,
                                misfire_grace_time=None)
        self._scheduler.start()

    def merge_now(self) -> MergeOutcome | None:
        """Plan, gate and (if accepted) publish a merge. Safe to call from any thread."""
        with self._merge_lock:
            outcome = self.engine.plan_merge()
            if outcome is None:
                return None
            record = outcome.record()
            if outcome.accepted:
                version = self._publish(outcome.state, reason="merge", base_version=outcome.base_version,
                                        merge=outcome.plan)
                self.engine.adopt_merge(outcome, version)
                self._state_changed = True
                record["version"] = version
                log.info("merge accepted: children %s -> v%d; held-out %s (served was %s) in %.2fs",
                         outcome.children, version, outcome.candidate_metrics, outcome.served_metrics,
                         outcome.seconds)
            else:
                log.warning("merge rejected: %s (children %s)", outcome.reason, outcome.children)
            self._best_effort(self.telemetry.merge, record)
            return outcome

    # --- durability ------------------------------------------------------------------------------------
    def _maybe_checkpoint(self, force: bool) -> None:
        pending = self._batches_since_checkpoint or self._state_changed
        due = (self._batches_since_checkpoint >= self.s.checkpoint_every_batches
               or (pending and time.monotonic() - self._last_checkpoint >= self.s.checkpoint_every_seconds))
        if not (due or (force and pending)):
            return
        meta, tensors = self.engine.checkpoint()
        meta["seq"] = int(time.time() * 1000)
        try:
            size = self.checkpoints.save(meta, tensors)
        except redis.RedisError as exc:
            log.warning("checkpoint not saved (%s): offsets stay uncommitted, will retry", exc)
            return
        if self._consumer is not None:
            try:
                self._consumer.commit(meta["applied_offsets"])
            except Exception as exc:  # kafka errors: the checkpoint knows the offsets; the next commit catches up
                log.warning("offset commit failed (%s); the checkpoint already records them", exc)
        self._batches_since_checkpoint = 0
        self._state_changed = False
        self._last_checkpoint = time.monotonic()
        log.debug("checkpoint saved (%d bytes), offsets committed %s", size, meta["applied_offsets"])
        self._best_effort(self.telemetry.metric, {
            "batches": self.engine.counters.batches, "counters": asdict(self.engine.counters),
            "prequential_accuracy": self.engine.prequential_accuracy(), "served_version": self.engine.served_version})


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
