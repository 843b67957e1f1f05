"""The batch consumer: a consumer group with manual commits (the engine decides what is durable)."""

from __future__ import annotations

import logging
from typing import Iterator

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from consumers.connection import KafkaConnection

log = logging.getLogger("filial.consumer")


class BatchConsumer:
    def __init__(self, connection: KafkaConnection, topic: str, group_id: str,
                 session_timeout_ms: int = 10_000, max_poll_records: int = 8,
                 max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.topic = topic
        self._consumer = KafkaConsumer(
            topic, group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=max(session_timeout_ms // 5, 500),
            max_poll_records=max_poll_records, max_partition_fetch_bytes=max_message_bytes + 1024,
            fetch_max_bytes=max(max_message_bytes + 1024, 52_428_800),
            **connection.client_kwargs())

    def poll(self, timeout_ms: int = 500) -> Iterator[ConsumerRecord]:
        for _, records in self._consumer.poll(timeout_ms=timeout_ms).items():
            yield from records

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
            self._consumer.commit(offsets)

    def lag(self) -> dict[str, int]:
        """Messages behind the log end, per owned partition."""
        owned = list(self._consumer.assignment())
        if not owned:
            return {}
        ends = self._consumer.end_offsets(owned)
        return {f"{tp.topic}:{tp.partition}": max(ends[tp] - self._consumer.position(tp), 0) for tp in owned}

    def close(self) -> None:
        self._consumer.close(autocommit=False)
