"""The applied-batch ledger: which records of each partition the engine has applied.

Per partition (``"topic:partition"``): the next offset to apply, and the producer ``batch_id`` of
the last ``max_ids`` batches applied from it. A record is a duplicate when its offset is below the
partition's next offset, or its ``batch_id`` was applied from that partition (a producer retry, or
a log that was reset and refilled). Keyed per partition so that a partition can move to another
process with its own entries. The ``batch_id`` of the last ``max_ids`` dead-lettered records is
kept too (not as applied): the consumer's log-reset check asks whether it knows the record at
the last applied offset, and that record may be a dead letter.

The service saves the ledger in the same checkpoint as the engine's state and commits offsets
from that checkpoint only: an offset is committed only once what it applied is durable.
Thread-safe (the consume loop writes it; the consumer's rebalance checks read it).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from consumers.wire import BatchSource

DEFAULT_MAX_IDS = 100_000


def source_key(source: BatchSource) -> str:
    return f"{source.topic}:{source.partition}"


@dataclass
class _Partition:
    next_offset: int = 0
    ids: deque[str] = field(default_factory=deque)
    id_set: set[str] = field(default_factory=set)
    dead_ids: deque[str] = field(default_factory=deque)
    dead_id_set: set[str] = field(default_factory=set)


def _remember(ids: deque[str], id_set: set[str], batch_id: str, cap: int) -> None:
    if batch_id in id_set:
        return
    if len(ids) >= cap:
        id_set.discard(ids.popleft())
    ids.append(batch_id)
    id_set.add(batch_id)


class AppliedLedger:
    def __init__(self, max_ids: int = DEFAULT_MAX_IDS) -> None:
        self.max_ids = max_ids
        self._partitions: dict[str, _Partition] = {}
        self._lock = threading.Lock()

    # --- the consume loop ---------------------------------------------------------------------------
    def already_applied(self, source: BatchSource | None, batch_id: str | None) -> bool:
        if source is None:
            return False
        with self._lock:
            part = self._partitions.get(source_key(source))
            if part is None:
                return False
            return source.offset < part.next_offset or (batch_id is not None and batch_id in part.id_set)

    def mark_applied(self, source: BatchSource | None, batch_id: str | None) -> None:
        """The record was applied (or skipped as a duplicate, or dead-lettered: ``batch_id`` None)."""
        if source is None:
            return
        with self._lock:
            part = self._partitions.setdefault(source_key(source), _Partition())
            part.next_offset = max(part.next_offset, source.offset + 1)
            if batch_id is not None:
                _remember(part.ids, part.id_set, batch_id, self.max_ids)

    def mark_dead_lettered(self, source: BatchSource | None, batch_id: str | None) -> None:
        """The record was dead-lettered: its offset moves on; its ``batch_id`` (from the raw headers, if
        any) is known, not applied."""
        self.mark_applied(source, None)
        if source is None or batch_id is None:
            return
        with self._lock:
            part = self._partitions[source_key(source)]
            _remember(part.dead_ids, part.dead_id_set, batch_id, self.max_ids)

    def next_offsets(self) -> dict[str, int]:
        """``{"topic:partition": next offset}``: what a commit after this checkpoint may say."""
        with self._lock:
            return {key: p.next_offset for key, p in self._partitions.items() if p.next_offset > 0}

    # --- consumers.batch_consumer.AppliedLog --------------------------------------------------------
    def applied_offset(self, partition_key: str) -> int:
        with self._lock:
            part = self._partitions.get(partition_key)
            return part.next_offset if part is not None else 0

    def knows_batch(self, partition_key: str, batch_id: str) -> bool:
        with self._lock:
            part = self._partitions.get(partition_key)
            return part is not None and (batch_id in part.id_set or batch_id in part.dead_id_set)

    def forget_partition(self, partition_key: str, reason: str) -> int | None:
        """The broker's log for this partition was reset: its offsets no longer name the batches
        applied, so stop skipping by offset; replays are still recognised by batch id."""
        with self._lock:
            part = self._partitions.get(partition_key)
            if part is None:
                return None
            dropped, part.next_offset = part.next_offset, 0
            return dropped

    # --- checkpoints (JSON) ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {key: {"next_offset": p.next_offset, "batch_ids": list(p.ids),
                          "dead_lettered_ids": list(p.dead_ids)}
                    for key, p in self._partitions.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], max_ids: int = DEFAULT_MAX_IDS) -> "AppliedLedger":
        ledger = cls(max_ids)
        for key, entry in data.items():
            ids = deque(entry["batch_ids"][-max_ids:])
            dead = deque(entry.get("dead_lettered_ids", [])[-max_ids:])  # absent in older checkpoints
            ledger._partitions[key] = _Partition(int(entry["next_offset"]), ids, set(ids), dead, set(dead))
        return ledger
