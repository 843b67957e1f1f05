"""The publisher thread: writes versions to Redis in order, retrying through outages.

Why a thread: a publish must survive a Redis outage (it retries until written) but ingest must
not wait for it longer than ``publish_block_seconds``. Callers hand over a fully prepared job
(weights bytes, manifest fields, a deterministic ``publish_id``) and get a Future; the thread
retries the job with capped exponential backoff, and on success runs the job's
``on_published(version)`` hook (which is where the engine adopts the version) before resolving
the future.

Safety comes from zoo_store.versions: one transaction per publish (never half-written) and the
``publish_id`` (a retry after an ambiguous failure, e.g. EXEC sent but the reply lost, returns
the version already written instead of announcing another).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import redis
import torch
from safetensors.torch import save as st_save

from daemon.engine.records import ChildRelease, Release
from daemon.learn.fingerprint import Fingerprint, encode_fingerprints
from daemon.service.failpoints import Failpoints
from zoo_store.connection import CappedBackoff
from zoo_store.lease import Fenced
from zoo_store.models import sha256_hex
from zoo_store.versions import Published, VersionStore
from zoo_store.zoo import ZooStore

log = logging.getLogger("filial.publisher")


class PublishAbandoned(Exception):
    """The service stopped before the job could be written; nothing of it is in Redis unless the
    last attempt's reply was lost (then the publish id makes the next run's retry a no-op)."""


@dataclass
class PublishJob:
    line: str
    reason: str
    weights: bytes
    publish_id: str
    manifest_fields: dict[str, Any]
    on_published: Callable[[Published], None] | None = None
    fencing_token: int | None = None   # the served line's publishes: the merge lease's token (zoo_store/lease.py)
    weights_sha256: str | None = None  # computed once, with the publish id (:func:`serialize`)
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)



def serialize(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """A state's safetensors bytes and their sha256 (hex): the manifest's ``weights_sha256``, and its
    first 24 characters make the publish id deterministic."""
    weights = st_save({k: v.contiguous() for k, v in state.items()})
    return weights, sha256_hex(weights)


def _fingerprint_fields(fingerprints: dict[str, Fingerprint]) -> dict[str, Any]:
    if not fingerprints:
        return {}
    return dict(fingerprint=st_save({k: v.contiguous() for k, v in encode_fingerprints(fingerprints).items()}),
                fingerprint_slices=list(fingerprints))


def release_job(line: str, release: Release, on_published: Callable[[Published], None],
                fencing_token: int | None = None, publisher: str | None = None) -> PublishJob:
    """The served model's next version. Deterministic: the same state published from the same
    parent is the same publish. Fenced by the merge lease's token when given."""
    weights, digest = serialize(release.state)
    fields = dict(architecture=release.architecture.model_dump(), base_version=release.base_version,
                  parent_version=release.parent_version, lineage=release.lineage, metrics=release.metrics,
                  merge=release.merge, continual=release.continual.record() if release.continual else None,
                  slices=sorted(release.metrics), publisher=publisher, **_fingerprint_fields(release.fingerprints))
    return PublishJob(line, release.reason, weights, f"{release.reason}:{release.parent_version}:{digest[:24]}",
                      fields, on_published, fencing_token, weights_sha256=digest)


def member_line(line: str, node_id: str, learner: str | None = None) -> str:
    """A child's line: ``{line}.{node_id}``, or ``{line}.{learner}-{node_id}`` among several learners."""
    return f"{line}.{learner}-{node_id}" if learner else f"{line}.{node_id}"


def child_job(line: str, release: ChildRelease, on_published: Callable[[Published], None],
              learner: str | None = None) -> PublishJob:
    """A child as a zoo member on its own line (:func:`member_line`); entered in the zoo once written."""
    weights, digest = serialize(release.state)
    fields = dict(architecture=release.architecture.model_dump(), parent_version=release.parent_version,
                  parent_line=line, lineage=release.lineage, metrics=release.metrics, kind="member",
                  slices=release.slices, spawn_method=release.spawn_method, base_version=release.base_version,
                  publisher=learner, **_fingerprint_fields(release.fingerprints))
    return PublishJob(member_line(line, release.node_id, learner), "retrain", weights,
                      f"child:{release.node_id}:{release.updates}:{digest[:24]}", fields, on_published,
                      weights_sha256=digest)

class Publisher:
    def __init__(self, versions: VersionStore, *, zoo: ZooStore | None = None, backoff_cap: float = 30.0,
                 on_failure: Callable[[str], None] | None = None,
                 observe_latency: Callable[[str, float], None] | None = None,
                 failpoints: Failpoints | None = None) -> None:
        self.versions = versions
        self.zoo = zoo  # members are entered in the zoo once written (None: members are not published)
        self.failpoints = failpoints or Failpoints()
        self.backoff_cap = backoff_cap
        self._on_failure = on_failure or (lambda reason: None)
        self._observe = observe_latency or (lambda reason, seconds: None)
        self._jobs: queue.Queue[PublishJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="filial-publisher", daemon=True)
        self._pending = 0
        self._lock = threading.Lock()

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, job: PublishJob) -> Future:
        if self._stop.is_set():
            job.future.set_exception(PublishAbandoned("publisher stopped"))
            return job.future
        with self._lock:
            self._pending += 1
        self._jobs.put(job)
        return job.future

    def stop(self, drain_seconds: float, hurry: threading.Event | None = None) -> None:
        """Let queued jobs finish for up to ``drain_seconds`` (a Redis outage may outlast it), or
        until ``hurry`` is set, then abandon the rest: their futures fail with :class:`PublishAbandoned`."""
        hurry = hurry or threading.Event()
        deadline = time.monotonic() + drain_seconds
        while self.pending and time.monotonic() < deadline and not hurry.is_set():
            hurry.wait(0.05)
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()) + 10)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(PublishAbandoned(f"{job.reason} {job.publish_id} not published"))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._publish(job)
            finally:
                with self._lock:
                    self._pending -= 1

    def _publish(self, job: PublishJob) -> None:
        backoff = CappedBackoff(base=0.2, cap=self.backoff_cap)
        while not self._stop.is_set():
            with self.failpoints.phase("publish"):
                try:
                    member = job.manifest_fields.get("kind") == "member"
                    store = self.zoo.versions if member and self.zoo is not None else self.versions
                    published = store.publish(job.line, job.weights, publish_id=job.publish_id, reason=job.reason,
                                              fencing_token=job.fencing_token, weights_sha256=job.weights_sha256,
                                              **job.manifest_fields)
                    if member and self.zoo is not None:
                        self.zoo.enter(job.line, published.manifest.version, job.reason)
                except Fenced as exc:  # another learner leads now: this version must never be written
                    log.warning("%s not published: %s", job.reason, exc)
                    job.future.set_exception(exc)
                    return
                except redis.RedisError as exc:
                    wait = backoff.failed()
                    self._on_failure(job.reason)
                    log.warning("publish of %s (%s) failed: %s; retrying in %.1fs (attempt %d)", job.reason,
                                job.publish_id, exc, wait, backoff.failures)
                    backoff.sleep(self._stop)
                    continue
                self.failpoints.pause("publish")  # written, not yet adopted: a crash here must not double it
                self._observe(job.reason, time.monotonic() - job.submitted_at)
                if not published.created:
                    log.info("publish %s was already written as v%d (a retried publish): not announcing it "
                             "again", job.publish_id, published.manifest.version)
                try:
                    if job.on_published is not None:
                        job.on_published(published)
                except Exception as exc:  # the version is durable either way; the caller learns of the failure
                    log.exception("after publishing v%d: %s", published.manifest.version, exc)
                    job.future.set_exception(exc)
                    return
            job.future.set_result(published)
            return
        job.future.set_exception(PublishAbandoned(f"{job.reason} {job.publish_id} not published (stopping)"))
