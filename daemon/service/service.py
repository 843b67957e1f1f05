"""The service around the engine: Kafka in, Redis out, merges on a schedule, durable offsets.

:class:`Service` wires the parts and runs them; each part is its own module:

- :mod:`~daemon.service.consume` — the consume loop (decode, dedup through the ledger, the engine, dead letters);
- :mod:`~daemon.service.checkpointer` — engine state + ledger saved together, then offsets committed;
- :mod:`~daemon.service.publisher` — the publisher thread (one transaction per version, retried);
- :mod:`~daemon.service.merge_job` — scheduled, gated merges;
- :mod:`~daemon.service.recovery` — the checkpoint and any unrecorded versions on start;
- :mod:`~daemon.service.health` — dependency probes, /healthz /readyz /metrics;
- :mod:`~daemon.service.lifecycle` — components start in order and stop in reverse.

Redis or the broker going away makes the service ``degraded`` (health), never stops it: batches
keep being applied in memory, checkpoints and publishes retry with capped backoff, and offsets
stay uncommitted until a checkpoint lands. On stop: the batch in hand finishes, a running merge
finishes, queued publishes get ``publish.drain_seconds``, a last checkpoint is saved and its
offsets committed. The invariants and threads: docs/architecture.md.
(Over 400 lines: this is the wiring of every part and the callbacks between them, the bootstrap publish
after a batch or a pause among them; the logic lives in the parts.)
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import asdict
from typing import Any, Callable

import redis

from consumers.batch_consumer import BatchConsumer
from consumers.dead_letter import DeadLetterProducer
from consumers.ledger import AppliedLedger
from daemon.engine.engine import Engine
from daemon.engine.records import BatchResult, MergeOutcome
from daemon.learn.training import cpu_has_bf16, precision_name, resolve_device
from daemon.service.checkpointer import Checkpointer
from daemon.service.connections import (broker_reachable, kafka_client, kafka_connection, redis_client,
                                        signing_key)
from daemon.service.consume import ConsumeLoop
from daemon.service.failpoints import Failpoints
from daemon.service.health import DependencyProber, HealthServer, HealthState
from daemon.service.lifecycle import Hooks, Lifecycle
from daemon.service.leadership import Leadership
from daemon.service.merge_job import IDLE_SECONDS, MergeJob
from daemon.service.metrics import ServiceMetrics
from daemon.service.publisher import PublishAbandoned, Publisher, release_job
from daemon.service.recovery import adopt_unrecorded_versions, ledger_from, load_checkpoint
from daemon.service.takeover import take_over_slice
from daemon.service.settings import Settings
from zoo_store.checkpoints import CheckpointStore, DeadLetterLog, InFlightMarker
from zoo_store.connection import probe_client
from zoo_store.contributions import ContributionStore
from zoo_store.keys import Keys
from zoo_store.telemetry import Telemetry
from zoo_store.versions import Published, VersionStore
from zoo_store.zoo import ZooFollower, ZooStore

log = logging.getLogger("filial.service")


class Service:
    def __init__(self, settings: Settings, on_result: Callable[[BatchResult], None] | None = None,
                 failpoints: Failpoints | None = None) -> None:
        if not settings.kafka.bootstrap or not settings.redis.url:
            raise ValueError("Service needs kafka.bootstrap and redis.url (the CLI starts embedded servers)")
        self.s = settings
        self.failpoints = failpoints or Failpoints()
        self.on_result = on_result
        self.engine = Engine(settings.model, settings.learner, settings.merge, resolve_device(settings.model.device))
        self.ledger = AppliedLedger()
        self.stop_event = threading.Event()
        self.hurry = threading.Event()  # a second stop signal: skip the publish drain (stop(hurry=True))
        self.metrics = ServiceMetrics()
        self.health = HealthState(settings.ops.health_stall_seconds)
        self.redis = redis_client(settings)
        keys = Keys(settings.redis.prefix, learner=settings.cluster.learner_id)
        self.versions = VersionStore(self.redis, keys, signing_key(settings), settings.publish.keep_versions)
        self.checkpoints = CheckpointStore(self.redis, keys)
        self.telemetry = Telemetry(self.redis, keys)
        zoo = ZooStore(VersionStore(self.redis, keys, signing_key(settings), settings.publish.zoo_keep_versions),
                       settings.publish.zoo_max_members, settings.publish.zoo_max_bytes)
        self.publisher = Publisher(self.versions, zoo=zoo if settings.publish.zoo else None,
                                   backoff_cap=settings.ops.backoff_max_seconds,
                                   on_failure=lambda reason: self.metrics.publish_failures.labels(reason).inc(),
                                   observe_latency=lambda reason, sec: self.metrics.publish_seconds.labels(reason)
                                   .observe(sec), failpoints=self.failpoints)
        # read from the publisher's own count at scrape time, so no submit/abandon path can skew it
        self.metrics.publish_pending.set_function(lambda: self.publisher.pending)
        self.checkpointer = Checkpointer(self.engine, self.ledger, self.checkpoints, settings.checkpoint,
                                         metrics=self.metrics, failpoints=self.failpoints,
                                         backoff_cap=settings.ops.backoff_max_seconds,
                                         redis_available=lambda: self.redis_available, on_saved=self._checkpointed,
                                         owned=self._owned_partitions)
        self.leadership = Leadership(self.redis, keys, settings.cluster, self.metrics)
        self.merge_job = MergeJob(self.engine, self.publisher, settings.merge, settings.publish.line,
                                  leadership=self.leadership, on_adopted=self._adopted, metrics=self.metrics,
                                  contributions=(ContributionStore(self.redis, keys) if settings.cluster.learner_id
                                                 else None),
                                  failpoints=self.failpoints, stop_event=self.stop_event,
                                  on_published=self._published,
                                  record=lambda record: self._best_effort(self.telemetry.merge, record),
                                  ingest_idle_seconds=self.health.idle_seconds)
        self.loop = ConsumeLoop(self.engine, self.ledger, self.checkpointer, settings.limits, metrics=self.metrics,
                                health=self.health, failpoints=self.failpoints,
                                backoff_cap=settings.ops.backoff_max_seconds, stop_event=self.stop_event,
                                record=lambda record: self._best_effort(self.telemetry.decision, record),
                                after_batch=self._after_batch, before_batch=self._before_batch,
                                on_idle=self._on_idle,
                                inflight=InFlightMarker(self.redis, keys),
                                crash_loop_after=settings.ops.crash_loop_after,
                                dead_letter_log=DeadLetterLog(self.redis, keys))
        self.health_server: HealthServer | None = None
        self._consumer: BatchConsumer | None = None
        self._bootstrap_publish: Future | None = None
        self._idle_checked_at_batch = 0  # the engine's batch count when an idle bootstrap was last considered
        self.published: list[int] = []

    # --- what callers and tests look at ------------------------------------------------------------------
    @property
    def redis_available(self) -> bool:
        return self.health.available("redis")

    @property
    def dead_lettered(self) -> int:
        return self.loop.dead_lettered

    @property
    def idle(self) -> threading.Event:
        return self.loop.idle

    def merge_now(self) -> MergeOutcome | None:
        return self.merge_job.merge_now()

    def _log_precision(self) -> None:
        device = self.engine.device
        log.info("computing in %s on %s (precision %s)", precision_name(device), device,
                 self.s.model.precision)
        if device.type == "cpu" and self.s.model.precision == "auto" and cpu_has_bf16():
            log.info("this CPU has bf16 instructions: FILIAL_PRECISION=bfloat16 trains and evaluates 1.3-1.4x "
                     "as fast at the same learning quality (README, \"Throughput\")")

    def stop(self, hurry: bool = False) -> None:
        """Stop :meth:`run` (from any thread; never from a signal handler: daemon/service/signals.py).
        ``hurry``: a faster stop that loses nothing: queued publishes are abandoned instead of being
        given ``publish.drain_seconds`` (a publish whose transaction is under way still completes)."""
        if hurry:
            self.hurry.set()
        self.stop_event.set()

    # --- running ----------------------------------------------------------------------------------------
    def restore(self) -> None:
        """The latest checkpoint into the engine and the ledger, then versions written after it."""
        saved = load_checkpoint(self.checkpoints, self.stop_event, self.s.ops.backoff_max_seconds)
        if saved is None:
            log.info("no checkpoint: starting a fresh engine")
            return
        meta, tensors = saved
        self.engine.restore(meta, tensors)
        self.ledger = ledger_from(meta)
        self.loop.ledger = self.checkpointer.ledger = self.ledger
        self.metrics.checkpoint_saved()
        log.info("restored checkpoint seq %s: served v%s, %d batches applied, offsets %s",
                 meta.get("seq"), meta["served_version"], meta["counters"]["batches"], self.ledger.next_offsets())
        try:
            for _ in range(adopt_unrecorded_versions(self.engine, self.versions, self.s.publish.line,
                                                     self.leadership.publisher)):
                self.checkpointer.note_adoption()  # checkpoint it at the first chance
        except redis.RedisError as exc:  # then the state is re-derived, as before recovery existed
            log.warning("could not look for versions written after the checkpoint (%s)", exc)
        self.metrics.served_version.set(self.engine.served_version or 0)
        self._best_effort(self.telemetry.save_tree, self.engine.describe_tree())

    def run(self) -> None:
        """Consume until :meth:`stop`; returns after the final checkpoint and commit."""
        life = Lifecycle()
        try:
            self._start_health_server(life)
            probe = probe_client(self.redis)
            life.start(Hooks("prober-client", stop=probe.close))
            life.start(DependencyProber(self.health, {"redis": lambda: _redis_problem(probe),
                                                      "kafka": lambda: broker_reachable(self.s.kafka.bootstrap)},
                                        self.s.ops.health_probe_seconds,
                                        on_result=lambda name, up: self.metrics.dependency_up.labels(name)
                                        .set(1 if up else 0)))
            life.start(Hooks("health-state", stop=self.health.stopped))
            self.restore()
            consumer, dead_letters = self._kafka_clients(life)
            if consumer is None or dead_letters is None:
                return  # stopped while the broker was away
            life.start(self.checkpointer)  # stops with the last checkpoint, before the clients close
            life.start(Hooks("publisher", start=self.publisher.start,
                             stop=lambda: self.publisher.stop(self.s.publish.drain_seconds, hurry=self.hurry)))
            life.start(self.leadership)
            life.start(self.merge_job)
            self.health.started()
            log.info("consuming %s as group %s; publishing to %s (line %s)", self.s.kafka.topic,
                     self.s.kafka.group_id, self.s.redis.url.split("@")[-1], self.s.publish.line)
            self._log_precision()
            self.loop.run(consumer, dead_letters)
        finally:
            self.stop_event.set()
            life.stop()
            log.info("stopped: %s", asdict(self.engine.counters))

    def _kafka_clients(self, life: Lifecycle) -> tuple[BatchConsumer | None, DeadLetterProducer | None]:
        conn, cap, k = kafka_connection(self.s), self.s.ops.backoff_max_seconds, self.s.kafka
        consumer = kafka_client("consumer", lambda: BatchConsumer(
            conn, k.topic, k.group_id, k.session_timeout_ms, max_message_bytes=self.s.limits.max_message_bytes,
            applied=_CountingLedger(self), on_revoked=self._revoked), self.stop_event, cap)
        if consumer is None:
            return None, None
        self._consumer = consumer
        life.start(Hooks("consumer", stop=consumer.close))
        dead_letters = kafka_client("dead-letter producer", lambda: DeadLetterProducer(
            conn, k.dead_letter_topic, self.s.limits.max_message_bytes), self.stop_event, cap)
        if dead_letters is not None:
            life.start(Hooks("dead-letter producer", stop=dead_letters.close))
        return consumer, dead_letters

    def _start_health_server(self, life: Lifecycle) -> None:
        ops = self.s.ops
        if ops.health_port < 0:
            return
        try:
            self.health_server = HealthServer(self.health, self.metrics.exposition, ops.health_host, ops.health_port)
            life.start(self.health_server)
        except OSError as exc:  # a busy port must not stop a learner; the log and missing probes say so
            self.health_server = None
            log.error("health server not started on %s:%s (%s); set FILIAL_HEALTH_PORT", ops.health_host,
                      ops.health_port, exc)

    # --- after each batch, each publish, each checkpoint ----------------------------------------------
    def _after_batch(self, result: BatchResult) -> None:
        for reason, gone in (("evicted", result.evicted_slice), ("superseded", result.superseded_slice)):
            if not gone:
                continue
            self.metrics.slices_dropped.labels(reason).inc()
            if gone != result.slice:  # a slice superseded by its own new labels goes on
                self.metrics.forget_slice(gone)
        if result.action in ("spawn", "retrain") or result.evicted_slice or result.superseded_slice:
            # {p}:tree is fresh between publishes
            self._best_effort(self.telemetry.save_tree, self.engine.describe_tree())
        if result.publish_bootstrap:
            self._publish_bootstrap()
        if result.merge_due:
            if self.s.merge.trigger == "count":
                try:
                    self.merge_job.merge_now()  # here, between two batches: the same stream merges the same way
                except Exception:  # a merge that cannot be computed must not stop ingest (as under the scheduler)
                    log.exception("merge failed; ingest goes on and the next due merge tries again")
            else:
                self.merge_job.nudge()
        if self.on_result:
            self.on_result(result)

    def _on_idle(self) -> None:
        """Ingest idle for ``IDLE_SECONDS`` after new batches while the first model still waits for
        batches (a short stream, or a pause after a first slice smaller than ``bootstrap_rows``): publish
        it if it is good enough on its held-out rows. Clock triggers only: under the count trigger nothing
        may depend on time (a stream and seed give the same versions)."""
        if self.s.merge.trigger == "count" or self.health.idle_seconds() < IDLE_SECONDS:
            return
        batches = self.engine.counters.batches
        if batches == self._idle_checked_at_batch:
            return  # once per idle period
        self._idle_checked_at_batch = batches
        if self.engine.served_version is None and self.engine.finish_bootstrap_idle(self.health.idle_seconds()):
            self._publish_bootstrap()

    def _publish_bootstrap(self) -> None:
        """Publish the first served model; wait for it at most ``publish.block_seconds``.

        While it is still retrying (Redis away) the engine keeps bootstrapping on new batches and
        asks again each batch; those requests are ignored until this one is written or abandoned.
        """
        if self._bootstrap_publish is not None and not self._bootstrap_publish.done():
            return
        self.merge_job.adopt_served_line()   # a line that already has versions is joined, never restarted
        if self.engine.served_version is not None:
            return
        claim = self.leadership.claim()
        if claim is None:  # another learner leads: serve its first version once it is there
            return

        release = self.engine.release_bootstrap()

        def adopt(published: Published) -> None:
            self.engine.adopt_bootstrap(published.manifest.version)
            self.engine.record_served(release)
            self._published(published)

        if self.redis_available:
            # the state about to be published, durable first: if the daemon dies after the write, the
            # restart finds this checkpoint and serves the written version (restore) instead of
            # re-deriving a different first model
            self.checkpointer.maybe_save(force=True)
        job = release_job(self.s.publish.line, release, adopt, claim.token, self.leadership.publisher)
        self._bootstrap_publish = self.publisher.submit(job)
        if self.s.merge.trigger == "count":  # reproducible: the next batch always sees the adopted version
            self.merge_job.await_publish(self._bootstrap_publish)
            return
        try:
            self._bootstrap_publish.result(timeout=self.s.publish.block_seconds)
        except FutureTimeout:
            log.warning("bootstrap publish still retrying after %.1fs; ingest goes on and it completes in the "
                        "background", self.s.publish.block_seconds)
        except PublishAbandoned:
            pass

    def _before_batch(self, batch) -> None:
        """Several learners: a slice new to this learner that another learner owned until a rebalance
        starts from that learner's rows and children (:mod:`daemon.service.takeover`)."""
        store = self.merge_job.contributions
        if store is None or self.engine.knows_slice(batch.slice):
            return
        zoo = (ZooFollower(self.redis, self.s.redis.prefix, signing_key(self.s))
               if self.s.publish.zoo else None)
        take_over_slice(self.engine, store, zoo, self.s.publish.line, self.s.cluster.learner_id, batch.slice)

    def _owned_partitions(self) -> set[str]:
        """Partitions assigned to this learner now (the consume thread's view; checkpoints run there)."""
        return self._consumer.owned() if self._consumer is not None else set()

    def _revoked(self, partitions) -> None:
        """Partitions move to another learner of the group: what was applied of them is made durable
        and committed first (called inside the consumer's poll, between two batches)."""
        log.info("partitions %s move to another learner: checkpointing and committing first",
                 sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))
        self.checkpointer.maybe_save(force=True)

    def _adopted(self) -> None:
        """Versions adopted from the served line (the leader's, a rollback): checkpoint them promptly."""
        self.checkpointer.note_adoption()
        self.metrics.served_version.set(self.engine.served_version or 0)

    def _published(self, published: Published) -> None:
        version = published.manifest.version
        self.published.append(version)
        self.checkpointer.note_adoption()
        self.metrics.served_version.set(version)
        self.metrics.served_quality(published.manifest.metrics, published.manifest.continual)
        self._best_effort(self.telemetry.metric, {"event": "version", "line": published.manifest.line,
                                                  "version": version, "reason": published.manifest.reason,
                                                  "accuracy": published.manifest.metrics,
                                                  **(published.manifest.continual or {})})
        self._best_effort(self.telemetry.save_tree, self.engine.describe_tree())

    def _checkpointed(self, meta: dict[str, Any]) -> None:
        self.loop.checkpointed(meta["applied_offsets"])
        if self._consumer is not None:
            try:
                self._consumer.commit(meta["applied_offsets"])
            except Exception as exc:  # kafka errors: the checkpoint knows the offsets; the next commit catches up
                log.warning("offset commit failed (%s); the checkpoint already records them", exc)
        status = self.engine.status()
        self._best_effort(self.telemetry.metric, {
            "batches": status.counters.batches, "counters": asdict(status.counters),
            "prequential_accuracy": status.prequential_accuracy, "served_version": status.served_version})

    def _best_effort(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self.redis_available:
            return  # known outage: do not spend the client's retries on every batch
        try:
            fn(*args)
        except redis.RedisError as exc:
            log.warning("telemetry not recorded (%s); ingest continues", exc)


class _CountingLedger:
    """The ledger as the consumer's AppliedLog, counting partition resets in the metrics."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def applied_offset(self, partition_key: str) -> int:
        return self.service.ledger.applied_offset(partition_key)

    def knows_batch(self, partition_key: str, batch_id: str) -> bool:
        return self.service.ledger.knows_batch(partition_key, batch_id)

    def forget_partition(self, partition_key: str, reason: str) -> None:
        self.service.metrics.log_resets.labels(partition_key).inc()
        dropped = self.service.ledger.forget_partition(partition_key, reason)
        log.warning("forgot applied offset %s of %s: %s", dropped, partition_key, reason)
        try:  # the group's position names the old log too
            self.service.checkpoints.forget_shared_offset(partition_key)
        except redis.RedisError as exc:
            log.warning("could not forget the group's position of %s (%s)", partition_key, exc)

    def group_offset(self, partition_key: str) -> int | None:
        try:
            return self.service.checkpoints.shared_offset(partition_key)
        except redis.RedisError as exc:  # then the group's committed offset decides, as with one learner
            log.warning("cannot read the group's position of %s (%s)", partition_key, exc)
            return None

    def taken_over(self, partition_key: str, offset: int) -> None:
        dropped = self.service.ledger.forget_partition(partition_key, "another learner applied it further")
        log.info("%s: another learner applied it up to %d while it was not ours (we had %s): resuming there",
                 partition_key, offset, dropped)


def _redis_problem(probe: redis.Redis) -> str | None:
    try:
        probe.ping()
        return None
    except redis.RedisError as exc:
        return str(exc) or type(exc).__name__
