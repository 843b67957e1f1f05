"""The dead-letter producer: rejected messages keep their bytes and headers, plus why.

Added headers: ``filial-reason`` (one of consumers.wire.REASONS), ``filial-detail`` (a sentence),
``filial-source`` (``topic:partition:offset``). :meth:`send` returns once the broker has the
message, so the source offset may be committed after it; it raises ``KafkaError`` after at most
about ``timeout`` seconds when the broker is unreachable (the caller retries: the source offset
must not move past a message that is in neither the engine nor the dead-letter topic).

A dead letter never needs more than the broker accepts: a payload over ``max_message_bytes`` (the
wire limit), or one the broker refuses as too large, is sent as a *reference*: an empty value and
the headers ``filial-payload: omitted``, ``filial-size`` (bytes) and ``filial-sha256`` (hex) of the
original, which stays readable at ``filial-source`` for as long as the source topic retains it.
Otherwise the send could never succeed and the loop would retry that message forever.

A process that dies during a send cannot know whether the broker appended the letter. The consume
loop notes each send before it begins (``zoo_store.checkpoints.DeadLetterLog``); a restart asks
:meth:`DeadLetterProducer.delivered`, which reads the topic from the earliest such note's time on for
the letters' ``filial-source`` headers, so a letter is neither lost nor sent twice.
"""

from __future__ import annotations

import hashlib
import logging
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from consumers.connection import KafkaConnection

log = logging.getLogger("filial.dead_letter")

# what the producer may send beyond the payload: headers (each ≤ max_header_bytes) and framing
HEADROOM_BYTES = 64 * 1024
# a letter's broker timestamp is its producer's clock at the send, after the note: read from a minute
# before the earliest note, for a clock that stepped back between the two
CLOCK_SLACK_MS = 60_000


class DeadLetterProducer:
    def __init__(self, connection: KafkaConnection, topic: str, max_message_bytes: int = 16 * 1024 * 1024,
                 timeout: float = 10.0) -> None:
        self.topic = topic
        self.timeout = timeout
        self.connection = connection
        self.max_payload_bytes = max_message_bytes
        # max_block_ms bounds the wait for metadata/buffer space, which is forever-ish by default
        self._producer = KafkaProducer(acks="all", retries=5, max_request_size=max_message_bytes + HEADROOM_BYTES,
                                       max_block_ms=int(timeout * 1000), request_timeout_ms=int(timeout * 1000),
                                       delivery_timeout_ms=int(timeout * 1000) + 1000,
                                       **connection.client_kwargs())

    def send(self, value: bytes | None, headers: list | None, reason: str, detail: str, source: str,
             timeout: float | None = None) -> bool:
        """Send the dead letter; True when it carries the payload, False when it is a reference."""
        value = bytes(value) if isinstance(value, (bytes, bytearray)) else b""
        kept = [(k, bytes(v)) for k, v in (headers or []) if isinstance(k, str)
                and isinstance(v, (bytes, bytearray)) and not k.startswith("filial-")]
        ours = [("filial-reason", reason.encode()), ("filial-detail", detail[:1000].encode()),
                ("filial-source", source.encode())]
        if len(value) <= self.max_payload_bytes and _size(kept) <= HEADROOM_BYTES // 2:
            try:
                self._send(value, kept + ours, timeout)
                return True
            except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:  # the broker's limit is lower
                log.warning("dead letter of %s refused as too large (%s); sending a reference", source, exc)
        self._send(b"", reference_headers(value, kept) + ours, timeout)
        return False

    def _send(self, value: bytes, headers: list[tuple[str, bytes]], timeout: float | None) -> None:
        self._producer.send(self.topic, value=value, headers=headers).get(timeout=timeout or self.timeout + 2)

    def delivered(self, sending: dict[str, int]) -> set[str]:
        """Which of the sources in ``sending`` (source -> when its send began, ms since the epoch) the
        topic holds a letter of. Reads every partition from that time on to its end; raises
        ``KafkaError`` when the topic cannot be read to its end within ``timeout``."""
        if not sending:
            return set()
        consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **self.connection.client_kwargs())
        try:
            partitions = consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            since = max(min(sending.values()) - CLOCK_SLACK_MS, 0)
            starts = consumer.offsets_for_times({tp: since for tp in tps})
            ends = consumer.end_offsets(tps)
            remaining = {}
            for tp in tps:
                start = starts.get(tp)  # none after ``since``: None, or (some brokers) a timestamp of -1
                if start is not None and start.timestamp >= 0 and 0 <= start.offset < ends[tp]:
                    consumer.seek(tp, start.offset)
                    remaining[tp] = ends[tp]
            found: set[str] = set()
            deadline = time.monotonic() + self.timeout
            while remaining:
                if time.monotonic() > deadline:
                    raise KafkaError(f"{self.topic} not read to its end in {self.timeout:.0f}s")
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        source = dict(record.headers or []).get("filial-source", b"").decode(errors="replace")
                        if source in sending:
                            found.add(source)
                # by position, not by the last record's offset: a topic's offsets may have gaps (compaction,
                # transaction markers)
                remaining = {tp: end for tp, end in remaining.items() if consumer.position(tp) < end}
            return found
        finally:
            consumer.close()

    def close(self) -> None:
        self._producer.close(timeout=5)


def reference_headers(value: bytes, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The original's headers (while they fit) and what identifies its payload."""
    kept, total = [], 0
    for key, val in headers:
        total += len(key) + len(val)
        if total > HEADROOM_BYTES // 2:
            kept.append(("filial-headers", b"truncated"))
            break
        kept.append((key, val))
    return kept + [("filial-payload", b"omitted"), ("filial-size", str(len(value)).encode()),
                   ("filial-sha256", hashlib.sha256(value).hexdigest().encode())]


def _size(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(k) + len(v) for k, v in headers)
