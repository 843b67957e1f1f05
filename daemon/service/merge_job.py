"""The merge job: APScheduler runs it on an interval or a crontab; the consume loop nudges it after
``merge.after_child_updates`` child updates. One merge at a time.

A CPU budget (``merge.cpu_share``) keeps merging from crowding out learning: after a merge that
used ``c`` CPU-seconds on its thread, scheduled runs and nudges rest ``c * (1/cpu_share - 1)``
seconds, so the merge job's share of a busy daemon's CPU stays at most ``cpu_share`` whatever a
merge costs (a larger zoo merges less often, not slower ingest). The budget protects learning, so it
holds only while there is some: once ingest has had nothing to do for ``IDLE_SECONDS`` (the end of a
stream, a pause of the producers) a tick merges at once, and followers get what was learned without
waiting out a rest. Nor do they wait for the tick: an idle watch (every ``IDLE_WATCH_SECONDS``) nudges
the job once per idle period that follows new batches, so the end of a burst is merged about
``IDLE_SECONDS`` after its last batch. Explicit ``merge_now()`` calls (operators, benchmarks, the count trigger) are not
held back; their cost still sets the rest.

A merge is planned and gated by the engine (on a snapshot, outside the engine's lock); an
accepted candidate is published by the publisher thread and adopted once written. Compact
children trained since their last release are then published on their own lines.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from datetime import datetime, timezone
from typing import Any, Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
import redis

from daemon.engine.engine import Engine
from daemon.engine.records import Contribution, MergeOutcome
from daemon.service.failpoints import Failpoints
from daemon.service.metrics import ServiceMetrics
from daemon.service.leadership import Leadership
from daemon.service.publisher import PublishAbandoned, Publisher, child_job, member_line, release_job
from daemon.service.recovery import adopt_unrecorded_versions
from daemon.service.settings import MergeJobSettings
from zoo_store.contributions import ContributionStore
from zoo_store.lease import Fenced
from zoo_store.versions import Published

log = logging.getLogger("filial.service")

# ingest with nothing to do for this long is idle: the merge job then does not rest (merge.cpu_share).
# Four times the consume loop's poll timeout, so a stream with short gaps between batches still counts as busy
IDLE_SECONDS = 2.0
IDLE_WATCH_SECONDS = 0.5  # how often the idle watch looks (in memory: no Redis; the engine only once idle)


class MergeJob:
    def __init__(self, engine: Engine, publisher: Publisher, settings: MergeJobSettings, line: str, *,
                 leadership: Leadership, metrics: ServiceMetrics, failpoints: Failpoints,
                 stop_event: threading.Event, on_published: Callable[[Published], None],
                 record: Callable[[dict[str, Any]], None], on_adopted: Callable[[], None] = lambda: None,
                 contributions: ContributionStore | None = None,
                 ingest_idle_seconds: Callable[[], float] = lambda: 0.0) -> None:
        self.engine = engine
        self.leadership = leadership
        self.publisher = publisher
        self.s = settings
        self.line = line
        self.metrics = metrics
        self.failpoints = failpoints
        self.stop_event = stop_event
        self.on_published = on_published  # the service's bookkeeping after an adoption
        self.on_adopted = on_adopted      # versions adopted from the served line: checkpoint them
        self.contributions = contributions  # several learners: what each contributes to the leader's merge
        self.record = record              # telemetry of the merge
        self.ingest_idle_seconds = ingest_idle_seconds  # how long the consume loop has had nothing to do
        self._lock = threading.Lock()
        self._scheduler: BackgroundScheduler | None = None
        self._rest_until = 0.0   # time.monotonic() before which scheduled runs and nudges wait (cpu_share)
        self._batches_merged_idle = 0   # the engine's batch count when the idle watch last nudged

    def start(self) -> None:
        if self.s.trigger == "count":
            return  # merges run in the consume loop (Service), after every after_child_updates updates
        self._scheduler = BackgroundScheduler(daemon=True)
        trigger = (CronTrigger.from_crontab(self.s.cron) if self.s.cron
                   else IntervalTrigger(seconds=self.s.interval_seconds))
        self._scheduler.add_job(self._scheduled, trigger, id="merge", max_instances=1, coalesce=True,
                                misfire_grace_time=None)
        self._scheduler.add_job(self._watch_idle, IntervalTrigger(seconds=IDLE_WATCH_SECONDS), id="idle-watch",
                                max_instances=1, coalesce=True)
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # a running merge completes (its publish is stop-aware)

    def nudge(self) -> None:
        """Run now (enough child updates); while a merge runs, or the job rests (``cpu_share``), it is
        not nudged: a later nudge or tick takes these updates."""
        if self._scheduler is not None and not self._lock.locked() and not self._must_rest():
            self._scheduler.modify_job("merge", next_run_time=datetime.now(timezone.utc))

    def _watch_idle(self) -> None:
        """Nudge the merge once ingest has been idle for ``IDLE_SECONDS`` after new batches: what the
        end of a stream (or a pause of the producers) taught reaches followers without waiting for the
        next tick. Once per idle period; a merge with nothing new to merge returns at once."""
        if self.ingest_idle_seconds() < IDLE_SECONDS:
            return
        batches = self.engine.counters.batches   # the engine's lock, which an idle consume loop does not hold
        if batches != self._batches_merged_idle:
            self._batches_merged_idle = batches
            log.info("ingest idle for %.0fs after batch %d: merging now", self.ingest_idle_seconds(), batches)
            self.nudge()

    def resting(self) -> bool:
        return self.rest_seconds() > 0

    def rest_seconds(self) -> float:
        """Seconds before a scheduled run or a nudge may merge again (``merge.cpu_share``)."""
        return max(self._rest_until - time.monotonic(), 0.0)

    def _must_rest(self) -> bool:
        """Resting, unless nothing would be crowded out: a candidate confirmed on fresh rows waits
        (publishing it computes no merge), or ingest is idle (the budget protects learning)."""
        return (self.resting() and not self.engine.candidate_confirmed()
                and self.ingest_idle_seconds() < IDLE_SECONDS)

    def _scheduled(self) -> None:
        if self._must_rest():
            log.debug("merge tick skipped: resting %.1fs more (merge.cpu_share %.2f)", self.rest_seconds(),
                      self.s.cpu_share)
            return
        if self.resting():
            log.info("merge tick runs though the job rests %.1fs more (merge.cpu_share): %s", self.rest_seconds(),
                     "a candidate confirmed on fresh rows waits" if self.engine.candidate_confirmed()
                     else f"ingest idle for {self.ingest_idle_seconds():.0f}s")
        self.merge_now()

    def merge_now(self) -> MergeOutcome | None:
        """Plan, gate and (if accepted) publish a merge. Safe to call from any thread; returns once
        the version is written (or the service stops: the publish then finishes or is abandoned)."""
        started = time.thread_time()
        try:
            return self._merge_now()
        finally:  # this thread's CPU only: the publisher's thread writes, the merge computes
            used = time.thread_time() - started
            self.metrics.merge_cpu_seconds.inc(used)
            self._rest_until = time.monotonic() + used * (1.0 / self.s.cpu_share - 1.0)

    def _merge_now(self) -> MergeOutcome | None:
        with self._lock:
            self.adopt_served_line()
            if self.engine.architecture is None:
                # no model at all (no batch applied, no served version adopted): a learner that took the
                # lease here would hold it while the one that learned could not publish (found by make
                # scale: a restarted learner without partitions led for good). One that is bootstrapping
                # keeps it: its first version is being published under it
                self.leadership.step_down("no model to merge from yet")
                return None
            claim = self.leadership.claim()
            others = self._others()
            self.engine.rehearse_others({name: rows for c in others for name, rows in c.replay.items()})
            if claim is None:  # another learner merges and publishes the served line: contribute to it
                self.engine.consolidate_working(others)
                self._contribute()
                self._publish_children()
                return None
            with self.failpoints.phase("merge"):
                outcome = self.engine.merge(others)
                if outcome is not None:
                    self.failpoints.pause("merge")
            if outcome is None:
                return None
            self.metrics.merges.labels("confirmed" if outcome.confirmed else
                                       "accepted" if outcome.accepted else "rejected").inc()
            record = outcome.record()
            if outcome.accepted:
                release = self.engine.release_merge(outcome)

                def adopt(published: Published) -> None:
                    self.engine.adopt_merge(outcome, published.manifest.version)
                    self.engine.record_served(release)
                    self.on_published(published)

                job = release_job(self.line, release, adopt, claim.token, self.leadership.publisher)
                published = self._await(self.publisher.submit(job))
                record["version"] = published.manifest.version if published else None
                if published:
                    log.info("merge %s: children %s -> v%d; held-out %s (served was %s) in %.2fs",
                             "confirmed on fresh rows" if outcome.confirmed else "accepted", outcome.children,
                             published.manifest.version, outcome.candidate_metrics, outcome.served_metrics,
                             outcome.seconds)
                else:
                    log.warning("merge accepted but not published before stopping; it is redone after restart")
            else:
                log.warning("merge rejected: %s (children %s)%s", outcome.reason, outcome.children,
                            "; held: judged again on the rows of each next batch before it trains"
                            if outcome.held else "")
            self.record(record)
            self._contribute()   # the leader's rows too: a later leader, or a learner taking a slice over, needs them
            self._publish_children()
            return outcome

    def _contribute(self) -> None:
        """This learner's served model as learned since the served version, and its slices' rows, for
        the leader's next merge."""
        learner = self.leadership.publisher
        mine = self.engine.contribution(learner or "") if self.contributions is not None and learner else None
        if mine is None:
            return
        try:
            self.contributions.write(learner, mine.version, mine.samples, mine.architecture, mine.state,
                                     mine.heldout, mine.replay)
        except redis.RedisError as exc:  # the next tick writes it again
            log.warning("contribution not written: %s", exc)

    def _others(self) -> list[Contribution]:
        """The other learners' latest contributions: the leader merges those built on its served
        version; every learner rehearses their slices' replay rows (:meth:`Engine.rehearse_others`)."""
        if self.contributions is None:
            return []
        try:
            stored = self.contributions.read_all(exclude=self.leadership.publisher)
        except redis.RedisError as exc:
            log.warning("contributions not read (%s): merging this learner's own work only", exc)
            return []
        return [Contribution(c.learner, c.version, c.samples, c.architecture, c.state, c.heldout, c.replay)
                for c in stored]

    def adopt_served_line(self) -> None:
        """Versions of the served line this learner did not write: the merge leader's (another
        learner) and `filial rollback`s are served from now on and learned on from."""
        try:
            adopted = adopt_unrecorded_versions(self.engine, self.publisher.versions, self.line,
                                                self.leadership.publisher)
        except redis.RedisError as exc:  # the next merge looks again
            log.warning("could not follow %s: %s", self.line, exc)
            return
        if adopted:
            self.on_adopted()

    def _publish_children(self) -> None:
        """The zoo: children trained since their last release, each a member on its own line
        ``{line}.{node_id}`` (same publisher, same guarantees: one transaction, idempotent publish
        id); members whose child retired leave it."""
        if self.publisher.zoo is None:
            return
        learner = self.leadership.publisher
        for release in self.engine.children_to_publish():
            job = child_job(self.line, release, lambda _published, r=release: self.engine.child_published(r), learner)
            if self._await(self.publisher.submit(job)) is None:
                return  # stopping: the next run publishes it
        mine = {member_line(self.line, c, learner) for c in self.engine.active_children()}
        own = member_line(self.line, "", learner)   # the prefix of this learner's member lines
        try:
            for member in self.publisher.zoo.members():
                if member.startswith(own) and member not in mine:
                    self.publisher.zoo.remove(member, "its child retired into the served model")
        except redis.RedisError as exc:  # the next merge tries again
            log.warning("could not remove retired members from the zoo: %s", exc)

    def await_publish(self, future: Future) -> Published | None:
        return self._await(future)

    def _await(self, future: Future) -> Published | None:
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if self.stop_event.is_set():
                    return None  # the publisher keeps trying during its drain; adoption still follows
            except (PublishAbandoned, Fenced):  # stopping, or another learner leads now (the publisher logged it)
                return None
