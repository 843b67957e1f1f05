"""Durable checkpoints: the engine's state and the applied-batch ledger saved together, then the
offsets committed from that checkpoint.

Invariants kept here (docs/architecture.md):
- offsets are committed only after a checkpoint that contains their effect has been saved;
- a version adopted by the engine is checkpointed at the first chance (until then a crash would
  redo its merge); a checkpoint never names a served version before that version is in Redis;
- while Redis is away, checkpoints are retried with capped backoff and the offsets stay
  uncommitted.

Called from the consume loop only (and once on stop), so the engine and the ledger it saves
describe the same batches.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis

from consumers.ledger import AppliedLedger
from daemon.engine.engine import Engine
from daemon.service.failpoints import Failpoints
from daemon.service.metrics import ServiceMetrics
from daemon.service.settings import CheckpointSettings
from zoo_store.checkpoints import CheckpointStore
from zoo_store.connection import CappedBackoff

log = logging.getLogger("filial.service")


class Checkpointer:
    def __init__(self, engine: Engine, ledger: AppliedLedger, store: CheckpointStore, settings: CheckpointSettings,
                 *, metrics: ServiceMetrics, failpoints: Failpoints, backoff_cap: float,
                 redis_available: Callable[[], bool], on_saved: Callable[[dict[str, Any]], None],
                 owned: Callable[[], set[str]] = lambda: set()) -> None:
        self.engine = engine
        self.ledger = ledger
        self.store = store
        self.s = settings
        self.metrics = metrics
        self.failpoints = failpoints
        self.redis_available = redis_available
        self.on_saved = on_saved  # commits the offsets, records telemetry
        self.owned = owned        # the partitions this learner owns now ("topic:partition")
        self.batches_since = 0
        self._adoptions = 0
        self._adoptions_lock = threading.Lock()
        self._last = time.monotonic()
        self._backoff = CappedBackoff(base=0.5, cap=backoff_cap)

    @property
    def adoptions(self) -> int:
        """Versions adopted since the last checkpoint."""
        with self._adoptions_lock:
            return self._adoptions

    def note_batch(self) -> None:
        self.batches_since += 1

    def note_adoption(self) -> None:
        """A published version was adopted (from the publisher's thread): checkpoint it promptly."""
        with self._adoptions_lock:
            self._adoptions += 1

    def start(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self.maybe_save(force=True)

    def maybe_save(self, force: bool) -> bool:
        """Save when due (or, with ``force``, whenever anything changed); True when a checkpoint was saved."""
        adoptions = self.adoptions
        changed = self.batches_since or adoptions
        due = (self.batches_since >= self.s.every_batches or adoptions
               or (changed and time.monotonic() - self._last >= self.s.every_seconds))
        if not (due or (force and changed)):
            return False
        if not force and not (self._backoff.ready() and self.redis_available()):
            return False  # known outage: an attempt could hold the loop for the client's connect timeouts
        with self.failpoints.phase("checkpoint"):
            meta, tensors = self.engine.checkpoint()
            meta["ledger"] = self.ledger.to_json()
            meta["applied_offsets"] = self.ledger.next_offsets()
            meta["seq"] = int(time.time() * 1000)
            try:
                owned = self.owned()
                size = self.store.save(meta, tensors, {k: v for k, v in meta["applied_offsets"].items() if k in owned})
            except redis.RedisError as exc:
                wait = self._backoff.failed()
                self.metrics.checkpoint_failures.inc()
                log.warning("checkpoint not saved (%s): offsets stay uncommitted; next try in %.1fs", exc, wait)
                return False
            self._backoff.succeeded()
            self.metrics.checkpoint_saved()
            self.failpoints.pause("checkpoint")  # saved, offsets not yet committed: a crash here re-reads, deduped
            self.on_saved(meta)
        self.batches_since = 0
        with self._adoptions_lock:
            self._adoptions -= adoptions
        self._last = time.monotonic()
        log.debug("checkpoint saved (%d bytes), offsets committed %s", size, meta["applied_offsets"])
        return True
