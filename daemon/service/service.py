"""The service around the engine: Kafka in, Redis out, merges on a schedule, durable offsets.

Threads: the consume loop (:meth:`Service.run`), the APScheduler merge job, the publisher
(daemon.service.publisher), the dependency prober, and the health/metrics HTTP server. Invariants kept
here (DESIGN.md):

- offsets are committed only after a checkpoint that contains their effect has been saved;
  a checkpoint never names a served version before that version is written to Redis;
- a dead-lettered message is acknowledged by the broker before its offset can be committed
  (while the broker is away the loop retries that message; nothing moves past it);
- a version is published in one transaction (zoo_store.versions) by the publisher thread,
  retried with the same publish id until written, so it is never half-written nor announced
  twice; ingest waits for a publish at most ``publish_block_seconds``;
- Redis or the broker going away makes the service ``degraded`` (health), never stops it: batches
  keep being applied in memory, checkpoints and publishes retry with capped backoff, and the
  offsets stay uncommitted until a checkpoint lands;
- on stop: the batch in hand finishes, a running merge finishes, queued publishes get
  ``publish_drain_seconds``, a last checkpoint is saved and its offsets committed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter as Tally
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import redis
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from kafka.errors import KafkaError
from pydantic import SecretStr
from safetensors.torch import load as st_load, save as st_save

from consumers.batch_consumer import BatchConsumer
from consumers.connection import KafkaConnection
from consumers.dead_letter import DeadLetterProducer
from consumers.wire import BatchSource, DecodeError, decode_batch
from daemon.service import failpoints as chaos_hooks
from daemon.engine.engine import BatchResult, Engine, MergeOutcome
from daemon.service.health import HealthServer, HealthState
from daemon.service.metrics import ServiceMetrics
from daemon.service.publisher import PublishAbandoned, Publisher, PublishJob
from daemon.service.settings import Settings
from daemon.learn.training import resolve_device
from zoo_store.checkpoints import CheckpointStore
from zoo_store.connection import CappedBackoff, connect, probe_client
from zoo_store.keys import Keys
from zoo_store.models import sha256_hex
from zoo_store.telemetry import Telemetry
from zoo_store.versions import Published, VersionNotFound, VersionStore

log = logging.getLogger("filial.service")


# --- connections (settings → clients) -------------------------------------------------------------
def secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret from its setting, else from its ``*_file`` setting (Docker/Kubernetes secrets)."""
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read secrets file {file}: {exc.strerror}") from None
    return None


def kafka_connection(s: Settings) -> KafkaConnection:
    password = secret(s.kafka.sasl_password, s.kafka.sasl_password_file)
    return KafkaConnection(bootstrap=s.kafka.bootstrap, security_protocol=s.kafka.security_protocol,
                           sasl_mechanism=s.kafka.sasl_mechanism, sasl_username=s.kafka.sasl_username,
                           sasl_password=SecretStr(password) if password else None, ssl_cafile=s.kafka.ssl_cafile,
                           ssl_certfile=s.kafka.ssl_certfile, ssl_keyfile=s.kafka.ssl_keyfile)


def redis_client(s: Settings) -> redis.Redis:
    return connect(s.redis.url, username=s.redis.username,
                   password=secret(s.redis.password, s.redis.password_file),
                   ssl_ca_file=str(s.redis.ssl_cafile) if s.redis.ssl_cafile else None,
                   ssl_cert_file=str(s.redis.ssl_certfile) if s.redis.ssl_certfile else None,
                   ssl_key_file=str(s.redis.ssl_keyfile) if s.redis.ssl_keyfile else None)


def signing_key(s: Settings) -> bytes | None:
    key = secret(s.publish.signing_key, s.publish.signing_key_file)
    return key.encode() if key else None


def broker_reachable(bootstrap: str, timeout: float = 1.0) -> str | None:
    """None when any bootstrap server accepts a TCP connection, else why not (a cheap, client-independent
    probe: kafka-python hides connection state and retries internally)."""
    problems = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout):
                return None
        except (OSError, ValueError) as exc:
            problems.append(f"{server}: {exc}")
    return "; ".join(problems)


class _EngineLog:
    """The engine as the consumer's AppliedLog, counting partition resets in the metrics."""

    def __init__(self, engine: Engine, metrics: ServiceMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def applied_offset(self, partition_key: str) -> int:
        return self.engine.applied_offset(partition_key)

    def knows_batch(self, batch_id: str) -> bool:
        return self.engine.knows_batch(batch_id)

    def forget_partition(self, partition_key: str, reason: str) -> None:
        self.metrics.log_resets.labels(partition_key).inc()
        self.engine.forget_partition(partition_key, reason)


class Service:
    def __init__(self, settings: Settings, on_result: Callable[[BatchResult], None] | None = None) -> None:
        if not settings.kafka.bootstrap or not settings.redis.url:
            raise ValueError("Service needs kafka_bootstrap and redis_url (the CLI starts embedded servers)")
        self.s = settings
        self.engine = Engine(settings, resolve_device(settings.model.device))
        self.keys = Keys(settings.redis.prefix)
        self.redis = redis_client(settings)
        self.versions = VersionStore(self.redis, self.keys, signing_key(settings), settings.publish.keep_versions)
        self.checkpoints = CheckpointStore(self.redis, self.keys)
        self.telemetry = Telemetry(self.redis, self.keys)
        self.metrics = ServiceMetrics()
        self.health = HealthState(settings.ops.health_stall_seconds)
        self.publisher = Publisher(self.versions, backoff_cap=settings.ops.backoff_max_seconds,
                                   on_failure=lambda reason: self.metrics.publish_failures.labels(reason).inc(),
                                   observe_latency=lambda reason, sec: self.metrics.publish_seconds.labels(reason)
                                   .observe(sec))
        # read from the publisher's own count at scrape time, so no submit/abandon path can skew it
        self.metrics.publish_pending.set_function(lambda: self.publisher.pending)
        self.stop_event = threading.Event()
        self.idle = threading.Event()  # set while the consumer has nothing to do
        self.on_result = on_result
        self.health_server: HealthServer | None = None
        self._last_checkpoint = time.monotonic()
        self._batches_since_checkpoint = 0
        self._adoptions = 0  # versions adopted since the last checkpoint: checkpoint them promptly
        self._checkpoint_backoff = CappedBackoff(base=0.5, cap=settings.ops.backoff_max_seconds)
        self._consumer: BatchConsumer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._merge_lock = threading.Lock()
        self._bootstrap_publish: Future | None = None
        self._next_lag_at = 0.0
        self.dead_lettered = 0
        self.published: list[int] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the latest checkpoint into the engine, waiting out a Redis outage (with backoff)."""
        backoff = CappedBackoff(base=0.5, cap=self.s.ops.backoff_max_seconds)
        while True:
            try:
                saved = self.checkpoints.load()
                break
            except redis.RedisError as exc:
                wait = backoff.failed()
                log.warning("cannot read the checkpoint (%s); retrying in %.1fs", exc, wait)
                backoff.sleep(self.stop_event)
                if self.stop_event.is_set():
                    raise
        if saved is None:
            log.info("no checkpoint: starting a fresh engine")
            return
        meta, tensors = saved
        self.engine.restore(meta, tensors)
        self.metrics.checkpoint_saved()
        log.info("restored checkpoint seq %s: served v%s, %d batches applied, offsets %s",
                 meta.get("seq"), meta["served_version"], meta["counters"]["batches"], meta["applied_offsets"])
        try:
            self._adopt_unrecorded_versions()
        except redis.RedisError as exc:  # then the state is re-derived, as before this existed
            log.warning("could not look for versions written after the checkpoint (%s)", exc)
        self.metrics.served_version.set(self.engine.served_version or 0)

    def _adopt_unrecorded_versions(self) -> None:
        """Serve versions this daemon wrote after its last checkpoint (a crash between the write and
        the checkpoint). Without this the restarted daemon would re-derive the state, publish it
        as yet another version and leave the written one unserved (an orphan)."""
        engine, line = self.engine, self.s.publish.line
        latest = self.versions.latest(line)
        while latest is not None and (engine.served_version or 0) < latest and engine.root is not None:
            served = engine.served_version
            candidates = range((served or 0) + 1, latest + 1)
            found = next(((m, w) for m, w in filter(None, map(self._verified_version, candidates))
                          if m.parent_version == served
                          and m.reason == ("bootstrap" if served is None else "merge")), None)
            if found is None:
                return
            manifest, weights = found
            state = st_load(weights)  # the bytes already checked: the blob is not fetched twice
            with engine.lock:
                root = engine.root
                if manifest.architecture != root.architecture.model_dump():
                    return
                if served is None:
                    root.model.load_state_dict(state)
                    engine.adopt_bootstrap(manifest.version)
                else:
                    children = [c.node_id for c in engine.tree.active_children()
                                if c.architecture == root.architecture]
                    engine.adopt_merge(MergeOutcome(
                        True, "adopted after restart", state, children, manifest.base_version, served, {},
                        dict(manifest.metrics), manifest.merge), manifest.version)
            self._adoptions += 1  # checkpoint it at the first chance
            log.warning("v%d (%s of v%s) was written before the last crash but not checkpointed: serving it "
                        "instead of re-deriving it", manifest.version, manifest.reason, served)

    def _verified_version(self, version: int):
        """``(manifest, weights)`` of ``version`` when both are there and the weights match, else None."""
        try:
            manifest = self.versions.manifest(self.s.publish.line, version)
            weights = self.versions.weights(self.s.publish.line, version)
        except VersionNotFound:
            return None
        if sha256_hex(weights) != manifest.weights_sha256:
            log.error("v%d's weights do not match its manifest: not adopting it", version)
            return None
        return manifest, weights

    def run(self) -> None:
        """Consume until :meth:`stop`; returns after the final checkpoint and commit."""
        self._start_health_server()
        prober = threading.Thread(target=self._probe_loop, name="filial-probe", daemon=True)
        prober.start()
        self.publisher.start()
        dead_letters = None
        try:
            self.restore()
            conn = kafka_connection(self.s)
            self._consumer = self._connect("consumer", lambda: BatchConsumer(
                conn, self.s.kafka.topic, self.s.kafka.group_id, self.s.kafka.session_timeout_ms,
                max_message_bytes=self.s.limits.max_message_bytes, applied=_EngineLog(self.engine, self.metrics)))
            dead_letters = self._connect("dead-letter producer", lambda: DeadLetterProducer(
                conn, self.s.kafka.dead_letter_topic, self.s.limits.max_message_bytes))
            if self._consumer is None or dead_letters is None:
                return  # stopped while the broker was away
            self._start_scheduler()
            self.health.started()
            log.info("consuming %s as group %s; publishing to %s (line %s)", self.s.kafka.topic, self.s.kafka.group_id,
                     self.s.redis.url.split("@")[-1], self.s.publish.line)
            self._consume(dead_letters)
        finally:
            self._shutdown(dead_letters)

    def stop(self) -> None:
        self.stop_event.set()

    def _consume(self, dead_letters: DeadLetterProducer) -> None:
        while not self.stop_event.is_set():
            self.health.tick()
            handled = 0
            try:
                for record in self._consumer.poll(timeout_ms=500):
                    self._handle(record, dead_letters)
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
            self._maybe_checkpoint(force=False)
            self._update_lag()

    def _shutdown(self, dead_letters: DeadLetterProducer | None) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # a running merge completes (its publish is stop-aware)
        self.publisher.stop(self.s.publish.drain_seconds)
        self._maybe_checkpoint(force=True)
        for closing in (dead_letters, self._consumer):
            if closing is not None:
                try:
                    closing.close()
                except Exception as exc:  # closing against a dead broker: nothing left to lose
                    log.warning("closing %s: %s", type(closing).__name__, exc)
        self.health.stopped()
        self.stop_event.set()  # the prober too
        if self.health_server is not None:
            self.health_server.stop()
        log.info("stopped: %s", asdict(self.engine.counters))

    def _connect(self, what: str, factory: Callable[[], Any]) -> Any:
        """Build a Kafka client, retrying with backoff while the broker is unreachable."""
        backoff = CappedBackoff(base=0.5, cap=self.s.ops.backoff_max_seconds)
        while not self.stop_event.is_set():
            try:
                return factory()
            except KafkaError as exc:
                wait = backoff.failed()
                log.warning("cannot start the %s (%s); retrying in %.1fs", what, exc, wait)
                backoff.sleep(self.stop_event)
        return None

    # --- health --------------------------------------------------------------------------------------
    def _start_health_server(self) -> None:
        if self.s.ops.health_port < 0:
            return
        try:
            self.health_server = HealthServer(self.health, self.metrics.exposition, self.s.ops.health_host,
                                              self.s.ops.health_port).start()
        except OSError as exc:  # a busy port must not stop a learner; the log and missing probes say so
            log.error("health server not started on %s:%s (%s); set FILIAL_HEALTH_PORT", self.s.ops.health_host,
                      self.s.ops.health_port, exc)

    def _probe_loop(self) -> None:
        """Probe Redis and the broker every ``health_probe_seconds``, from its own thread, so health is
        current even while the loop trains on a batch."""
        probe = probe_client(self.redis)
        while not self.stop_event.is_set():
            try:
                probe.ping()
                redis_problem = None
            except redis.RedisError as exc:
                redis_problem = str(exc) or type(exc).__name__
            kafka_problem = broker_reachable(self.s.kafka.bootstrap)
            for name, problem in (("redis", redis_problem), ("kafka", kafka_problem)):
                self.health.dependency(name, problem)
                self.metrics.dependency_up.labels(name).set(0 if problem else 1)
            self.stop_event.wait(self.s.ops.health_probe_seconds)
        probe.close()

    @property
    def redis_available(self) -> bool:
        return self.health.available("redis")

    def _update_lag(self) -> None:
        if time.monotonic() < self._next_lag_at or self._consumer is None:
            return
        self._next_lag_at = time.monotonic() + 5.0
        try:
            for partition, lag in self._consumer.lag().items():
                self.metrics.lag.labels(partition).set(lag)
        except KafkaError as exc:
            log.debug("lag not measured: %s", exc)

    # --- per message -------------------------------------------------------------------------------
    def _handle(self, record, dead_letters: DeadLetterProducer) -> None:
        source = BatchSource(record.topic, record.partition, record.offset)
        try:
            batch = decode_batch(record.value, record.headers, self.s.limits,
                                 expected_shape=self.engine.expected_shapes(), source=source)
        except DecodeError as exc:
            self._dead_letter(record, exc, dead_letters, source)
            return
        with chaos_hooks.phase("train"):
            result = self.engine.process(batch)
        self._batches_since_checkpoint += 1
        self._record(result)
        if result.publish_bootstrap:
            self._publish_bootstrap()
        # while a merge runs, it is not nudged again: the next one takes these updates
        if result.merge_due and self._scheduler is not None and not self._merge_lock.locked():
            self._scheduler.modify_job("merge", next_run_time=_now())
        if self.on_result:
            self.on_result(result)

    def _dead_letter(self, record, exc: DecodeError, dead_letters: DeadLetterProducer, source: BatchSource) -> None:
        where = f"{record.topic}:{record.partition}:{record.offset}"
        log.warning("dead-letter %s: %s", where, exc)
        backoff = CappedBackoff(base=0.5, cap=self.s.ops.backoff_max_seconds)
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
        self.engine.note_skipped(source)
        self.dead_lettered += 1
        self._batches_since_checkpoint += 1

    def _record(self, r: BatchResult) -> None:
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
        preq = self.engine.prequential_accuracy().get(r.slice)
        if preq is not None:
            m.prequential.labels(r.slice).set(preq)
        statuses = Tally(n.status for n in list(self.engine.tree.nodes.values()))
        for status in ("active", "retired"):
            m.children.labels(status).set(statuses.get(status, 0))
        self._best_effort(self.telemetry.decision, r.record())

    def _best_effort(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self.redis_available:
            return  # known outage: do not spend the client's retries on every batch
        try:
            fn(*args)
        except redis.RedisError as exc:
            log.warning("telemetry not recorded (%s); ingest continues", exc)

    # --- publishing --------------------------------------------------------------------------------------
    def _job(self, state, *, reason: str, base_version: int | None, merge: dict[str, Any] | None,
             on_published: Callable[[Published], None]) -> PublishJob:
        """Everything a publish needs, computed now (under the engine lock) so the publisher thread
        never touches the engine until the version is written."""
        weights, digest = _serialize(state)
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
        # deterministic: the same state published from the same parent is the same publish
        publish_id = f"{reason}:{parent_version}:{digest}"
        fields = dict(architecture=architecture, base_version=base_version, parent_version=parent_version,
                      lineage=lineage, metrics=metrics, merge=merge)
        return PublishJob(self.s.publish.line, reason, weights, publish_id, fields, on_published)

    def _published(self, version: int) -> None:
        self.published.append(version)
        self._adoptions += 1
        self.metrics.served_version.set(version)
        self._best_effort(self.telemetry.save_tree, self.engine.tree.describe())

    def _publish_bootstrap(self) -> None:
        """Publish the first served model; wait for it at most ``publish_block_seconds``.

        While it is still retrying (Redis away) the engine keeps bootstrapping on new batches and
        asks again each batch; those requests are ignored until this one is written or abandoned.
        """
        if self._bootstrap_publish is not None and not self._bootstrap_publish.done():
            return

        def adopt(published: Published) -> None:
            self.engine.adopt_bootstrap(published.manifest.version)
            self._published(published.manifest.version)

        if self.redis_available:
            # the state about to be published, durable first: if the daemon dies after the write, the
            # restart finds this checkpoint and serves the written version (restore) instead of
            # re-deriving a different first model
            self._maybe_checkpoint(force=True)
        job = self._job(self.engine.served_state(), reason="bootstrap", base_version=None, merge=None,
                        on_published=adopt)
        self._bootstrap_publish = self.publisher.submit(job)
        try:
            self._bootstrap_publish.result(timeout=self.s.publish.block_seconds)
        except FutureTimeout:
            log.warning("bootstrap publish still retrying after %.1fs; ingest goes on and it completes in the "
                        "background", self.s.publish.block_seconds)
        except PublishAbandoned:
            pass

    # --- merging ----------------------------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        self._scheduler = BackgroundScheduler(daemon=True)
        trigger = (CronTrigger.from_crontab(self.s.merge.cron) if self.s.merge.cron
                   else IntervalTrigger(seconds=self.s.merge.interval_seconds))
        self._scheduler.add_job(self.merge_now, trigger, id="merge", max_instances=1, coalesce=True,
                                misfire_grace_time=None)
        self._scheduler.start()

    def merge_now(self) -> MergeOutcome | None:
        """Plan, gate and (if accepted) publish a merge. Safe to call from any thread; returns once
        the version is written (or the service stops: the publish then finishes or is abandoned)."""
        with self._merge_lock:
            with chaos_hooks.phase("merge"):
                outcome = self.engine.plan_merge()
                if outcome is not None:
                    chaos_hooks.pause("merge")
            if outcome is None:
                return None
            self.metrics.merges.labels("accepted" if outcome.accepted else "rejected").inc()
            record = outcome.record()
            if outcome.accepted:
                def adopt(published: Published) -> None:
                    self.engine.adopt_merge(outcome, published.manifest.version)
                    self._published(published.manifest.version)

                job = self._job(outcome.state, reason="merge", base_version=outcome.base_version,
                                merge=outcome.plan, on_published=adopt)
                published = self._await(self.publisher.submit(job))
                record["version"] = published.manifest.version if published else None
                if published:
                    log.info("merge accepted: children %s -> v%d; held-out %s (served was %s) in %.2fs",
                             outcome.children, published.manifest.version, outcome.candidate_metrics,
                             outcome.served_metrics, outcome.seconds)
                else:
                    log.warning("merge accepted but not published before stopping; it is redone after restart")
            else:
                log.warning("merge rejected: %s (children %s)", outcome.reason, outcome.children)
            self._best_effort(self.telemetry.merge, record)
            self._publish_compact_children()
            return outcome

    def _publish_compact_children(self) -> None:
        """Compact children trained since their last release, each on its own line ``{line}.{node_id}``
        (same publisher, same guarantees: one transaction, idempotent publish id)."""
        for release in self.engine.compact_children_to_publish():
            weights, digest = _serialize(release.state)
            publish_id = f"child:{release.node_id}:{release.updates}:{digest}"
            fields = dict(architecture=release.architecture.model_dump(), parent_version=release.parent_version,
                          parent_line=self.s.publish.line, lineage=release.lineage, metrics=release.metrics)
            job = PublishJob(f"{self.s.publish.line}.{release.node_id}", "retrain", weights, publish_id, fields,
                             on_published=lambda _published, r=release: self.engine.child_published(r))
            if self._await(self.publisher.submit(job)) is None:
                return  # stopping: the next run publishes it

    def _await(self, future: Future) -> Published | None:
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if self.stop_event.is_set():
                    return None  # the publisher keeps trying during its drain; adoption still follows
            except PublishAbandoned:
                return None

    # --- durability ------------------------------------------------------------------------------------
    def _maybe_checkpoint(self, force: bool) -> None:
        changed = self._batches_since_checkpoint or self._adoptions
        # an adopted version is checkpointed at once: until then a crash would redo its merge
        due = (self._batches_since_checkpoint >= self.s.checkpoint.every_batches or self._adoptions
               or (changed and time.monotonic() - self._last_checkpoint >= self.s.checkpoint.every_seconds))
        if not (due or (force and changed)):
            return
        if not force and not (self._checkpoint_backoff.ready() and self.redis_available):
            return  # known outage: an attempt could hold the loop for the client's connect timeouts
        with chaos_hooks.phase("checkpoint"):
            adoptions = self._adoptions
            meta, tensors = self.engine.checkpoint()
            meta["seq"] = int(time.time() * 1000)
            try:
                size = self.checkpoints.save(meta, tensors)
            except redis.RedisError as exc:
                wait = self._checkpoint_backoff.failed()
                self.metrics.checkpoint_failures.inc()
                log.warning("checkpoint not saved (%s): offsets stay uncommitted; next try in %.1fs", exc, wait)
                return
            self._checkpoint_backoff.succeeded()
            self.metrics.checkpoint_saved()
            chaos_hooks.pause("checkpoint")  # saved, offsets not yet committed: a crash here re-reads, deduped
            if self._consumer is not None:
                try:
                    self._consumer.commit(meta["applied_offsets"])
                except Exception as exc:  # kafka errors: the checkpoint knows the offsets; the next commit catches up
                    log.warning("offset commit failed (%s); the checkpoint already records them", exc)
        self._batches_since_checkpoint = 0
        self._adoptions -= adoptions
        self._last_checkpoint = time.monotonic()
        log.debug("checkpoint saved (%d bytes), offsets committed %s", size, meta["applied_offsets"])
        self._best_effort(self.telemetry.metric, {
            "batches": self.engine.counters.batches, "counters": asdict(self.engine.counters),
            "prequential_accuracy": self.engine.prequential_accuracy(), "served_version": self.engine.served_version})


def _serialize(state) -> tuple[bytes, str]:
    """A state's safetensors bytes and the digest prefix that makes its publish id deterministic."""
    weights = st_save({k: v.contiguous() for k, v in state.items()})
    return weights, sha256_hex(weights)[:24]


def _now() -> datetime:
    return datetime.now(timezone.utc)
