"""The batch consumer: a consumer group with manual commits (the engine decides what is durable).

Positions come from the engine's checkpoint, not only from the group: whenever partitions are
(re)assigned, each one the engine has applied up to offset ``A`` is checked against the broker:

- the log ends before ``A`` → the broker lost the log (a memory-only broker restarted, the topic
  was recreated): the partition's applied offset is forgotten and it is read from the beginning;
  replayed batches are still recognised by their ``batch_id``;
- the group's position is past ``A`` (the offset the partition's last owner checkpointed, shared in
  Redis, or the group's committed offset) → another learner of the group owned the partition
  meanwhile (a rebalance) and applied it up to there: resume there;
- otherwise the consumer seeks to ``A - 1`` and looks at that record: if it carries a
  ``batch_id`` the engine does not know, the log was reset *and* already refilled past ``A``
  (same handling); if it is the batch the engine applied, consumption resumes at ``A`` (not at the
  possibly older committed offset: the checkpoint is the truth).

Every broker call has a timeout: an unreachable broker is reported, never waited on forever.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Protocol

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.connection import KafkaConnection

log = logging.getLogger("filial.consumer")


class AppliedLog(Protocol):
    """What the consumer asks the ledger (the checkpoint's view of what was applied; consumers.ledger)."""

    def applied_offset(self, partition_key: str) -> int: ...

    def knows_batch(self, partition_key: str, batch_id: str) -> bool: ...

    def forget_partition(self, partition_key: str, reason: str) -> None: ...

    def group_offset(self, partition_key: str) -> int | None:
        """The next offset to apply as the partition's last owner checkpointed it (several learners), or None."""
        ...

    def taken_over(self, partition_key: str, offset: int) -> None:
        """Another learner applied the partition up to ``offset`` while it was not ours: forget our older position."""
        ...


def partition_key(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def record_batch_id(record: ConsumerRecord) -> str | None:
    for key, value in record.headers or ():
        if key == "batch_id" and isinstance(value, (bytes, bytearray)):
            try:
                return bytes(value).decode()
            except UnicodeDecodeError:
                return None
    return None


class _Assignments(ConsumerRebalanceListener):
    def __init__(self, on_revoked: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self.unchecked: set[TopicPartition] = set()
        self.on_revoked = on_revoked

    def on_partitions_revoked(self, revoked) -> None:
        # still ours here: the engine makes what it applied durable and commits it, so the partition's
        # next owner (another learner of the group) starts exactly where this one stopped
        if self.on_revoked is not None and revoked:
            try:
                self.on_revoked(set(revoked))
            except Exception:  # a failed save must not break the rebalance; the next owner dedups by offset
                log.exception("saving before giving up %s failed", sorted(map(partition_key, revoked)))
        self.unchecked -= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.unchecked |= set(assigned)


class BatchConsumer:
    def __init__(self, connection: KafkaConnection, topic: str, group_id: str,
                 session_timeout_ms: int = 10_000, max_poll_records: int = 8,
                 max_message_bytes: int = 16 * 1024 * 1024, applied: AppliedLog | None = None,
                 request_timeout_ms: int = 5_000,
                 on_revoked: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self.topic = topic
        self.applied = applied
        self.timeout_ms = request_timeout_ms
        self._assignments = _Assignments(on_revoked)
        self._verify: dict[TopicPartition, int] = {}  # partition -> offset whose record must be known
        self._consumer = KafkaConsumer(
            group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=max(session_timeout_ms // 5, 500),
            max_poll_records=max_poll_records, max_partition_fetch_bytes=max_message_bytes + 1024,
            fetch_max_bytes=max(max_message_bytes + 1024, 52_428_800),
            **connection.client_kwargs())
        self._consumer.subscribe([topic], listener=self._assignments)

    def poll(self, timeout_ms: int = 500) -> Iterator[ConsumerRecord]:
        records = self._consumer.poll(timeout_ms=timeout_ms)
        moved = self._check_assigned()
        for tp, batch in records.items():
            if tp in moved:
                continue  # fetched from the old position; the check moved it
            if tp in self._assignments.unchecked:
                # not yet compared with the checkpoint (the broker did not answer): fetch these again later
                self._consumer.seek(tp, batch[0].offset)
                continue
            if tp in self._verify:
                batch = self._verified(tp, batch)
            yield from batch

    # --- positions from the checkpoint ------------------------------------------------------------
    def _check_assigned(self) -> set[TopicPartition]:
        """Compare newly assigned partitions with the checkpoint; returns those whose position moved."""
        moved: set[TopicPartition] = set()
        if self.applied is None:
            self._assignments.unchecked.clear()
            return moved
        for tp in list(self._assignments.unchecked):
            key = partition_key(tp)
            applied = self.applied.applied_offset(key)
            group = self.applied.group_offset(key) or 0
            if applied <= 0 and group <= 0:
                self._assignments.unchecked.discard(tp)
                continue
            try:
                begin = self._consumer.beginning_offsets([tp], timeout_ms=self.timeout_ms)[tp]
                end = self._consumer.end_offsets([tp], timeout_ms=self.timeout_ms)[tp]
            except KafkaError as exc:
                log.warning("cannot check %s against the checkpoint yet (%s); will retry", key, exc)
                return moved
            self._assignments.unchecked.discard(tp)
            moved.add(tp)
            ahead = max(group, self._committed(tp) or 0)
            if applied < ahead <= end:
                # another learner of the group owned it meanwhile and checkpointed (or committed) up to there
                if applied > 0:
                    self.applied.taken_over(key, ahead)
                self._consumer.seek(tp, ahead)
            elif applied <= 0:
                moved.discard(tp)   # nothing of ours to compare; the group's position is past the log (reset)
            elif end < applied:
                self._reset(tp, f"log ends at {end}, before the applied offset {applied}")
            elif begin >= applied:
                self._consumer.seek(tp, begin)  # older records expired (retention): nothing to compare
            else:
                self._consumer.seek(tp, applied - 1)
                self._verify[tp] = applied - 1
        return moved

    def _committed(self, tp: TopicPartition) -> int | None:
        try:
            return self._consumer.committed(tp)
        except KafkaError as exc:  # compared again at the next assignment; the checkpoint stays the truth
            log.warning("cannot read the committed offset of %s (%s)", partition_key(tp), exc)
            return None

    def _verified(self, tp: TopicPartition, batch: list[ConsumerRecord]) -> list[ConsumerRecord]:
        expected = self._verify.pop(tp)
        first = batch[0]
        batch_id = record_batch_id(first)
        if batch_id is not None and self.applied.knows_batch(partition_key(tp), batch_id):
            return [r for r in batch if r.offset > expected]  # the last applied record itself is skipped
        if batch_id is None and first.offset == expected:
            return batch[1:]  # a producer without batch ids: the offsets are all there is to trust
        self._reset(tp, f"the record at the last applied offset {expected} is "
                        f"{'batch ' + repr(batch_id) if batch_id else 'offset ' + str(first.offset)}, "
                        "which this engine never applied")
        return []

    def _reset(self, tp: TopicPartition, why: str) -> None:
        log.warning("partition %s: the broker's log was reset (%s); reading it from the beginning, "
                    "batches already applied are recognised by batch_id", partition_key(tp), why)
        self.applied.forget_partition(partition_key(tp), why)
        self._verify.pop(tp, None)
        self._consumer.seek_to_beginning(tp)

    # --- commits and lag -------------------------------------------------------------------------------
    def commit(self, next_offsets: dict[str, int]) -> None:
        """Commit ``{"topic:partition": next_offset}``; partitions we no longer own are skipped."""
        owned = self._consumer.assignment()
        offsets = {}
        for key, offset in next_offsets.items():
            topic, _, partition = key.rpartition(":")
            tp = TopicPartition(topic, int(partition))
            if tp in owned:
                offsets[tp] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self._consumer.commit(offsets, timeout_ms=self.timeout_ms)

    def owned(self) -> set[str]:
        """The partitions assigned now, as ``topic:partition``."""
        return {partition_key(tp) for tp in self._consumer.assignment()}

    def lag(self) -> dict[str, int]:
        """Messages behind the log end, per owned partition."""
        owned = list(self._consumer.assignment())
        if not owned:
            return {}
        ends = self._consumer.end_offsets(owned, timeout_ms=self.timeout_ms)
        return {partition_key(tp): max(ends[tp] - self._consumer.position(tp, timeout_ms=self.timeout_ms), 0)
                for tp in owned}

    def close(self) -> None:
        self._consumer.close(autocommit=False, timeout_ms=self.timeout_ms)
