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
"""

from __future__ import annotations

import hashlib
import logging

from kafka import KafkaProducer
from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from consumers.connection import KafkaConnection

log = logging.getLogger("filial.dead_letter")

# what the producer may send beyond the payload: headers (each ≤ max_header_bytes) and framing
HEADROOM_BYTES = 64 * 1024


class DeadLetterProducer:
    def __init__(self, connection: KafkaConnection, topic: str, max_message_bytes: int = 16 * 1024 * 1024,
                 timeout: float = 10.0) -> None:
        self.topic = topic
        self.timeout = timeout
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
