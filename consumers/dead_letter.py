"""The dead-letter producer: rejected messages keep their bytes and headers, plus why.

Added headers: ``filial-reason`` (one of consumers.wire.REASONS), ``filial-detail`` (a sentence),
``filial-source`` (``topic:partition:offset``). :meth:`send` returns once the broker has the
message, so the source offset may be committed after it; it raises ``KafkaError`` after at most
about ``timeout`` seconds when the broker is unreachable (the caller retries: the source offset
must not move past a message that is in neither the engine nor the dead-letter topic).
"""

from __future__ import annotations

import logging

from kafka import KafkaProducer

from consumers.connection import KafkaConnection

log = logging.getLogger("filial.dead_letter")


class DeadLetterProducer:
    def __init__(self, connection: KafkaConnection, topic: str, max_message_bytes: int = 16 * 1024 * 1024,
                 timeout: float = 10.0) -> None:
        self.topic = topic
        self.timeout = timeout
        # max_block_ms bounds the wait for metadata/buffer space, which is forever-ish by default
        self._producer = KafkaProducer(acks="all", retries=5, max_request_size=max_message_bytes + 4096,
                                       max_block_ms=int(timeout * 1000), request_timeout_ms=int(timeout * 1000),
                                       delivery_timeout_ms=int(timeout * 1000) + 1000,
                                       **connection.client_kwargs())

    def send(self, value: bytes | None, headers: list | None, reason: str, detail: str, source: str,
             timeout: float | None = None) -> None:
        kept = [(k, v) for k, v in (headers or []) if isinstance(k, str) and isinstance(v, (bytes, bytearray))
                and not k.startswith("filial-")]
        kept += [("filial-reason", reason.encode()), ("filial-detail", detail[:1000].encode()),
                 ("filial-source", source.encode())]
        self._producer.send(self.topic, value=value if isinstance(value, (bytes, bytearray)) else b"",
                            headers=kept).get(timeout=timeout or self.timeout + 2)

    def close(self) -> None:
        self._producer.close(timeout=5)
