"""Ingest: consume + decode MB/s of kafka-python as filial configures it, on a pre-filled topic of the
embedded broker (loopback), with the CRC-32C check in C (the ``crc32c`` extension) — and, with
``--pure-python``, as kafka-python runs without it.

Fills a topic with ``--messages`` batches of ``--rows`` MNIST-shaped uint8 images (the wire format of
``filial produce``), then reads them back ``--repeats`` times, each with a fresh consumer group: poll
only, and poll + ``consumers.wire.decode_batch`` (validation and safetensors decoding, what the daemon
does before training). Last line: one JSON object with ``ingest_mb_per_s`` (consume + decode, best of
the repeats), ``consume_mb_per_s`` and ``crc32c_extension``.

The same topic is also read by kafka-python exactly as the daemon configures it
(:class:`consumers.batch_consumer.BatchConsumer`: at most 8 records per poll) and by confluent-kafka
(librdkafka; ``check.crcs`` on, as kafka-python always checks them), consume only and consume + decode:
``by_client`` (MB/s, best of the repeats). Every client's clock starts at its first record (so the
group join is not counted; the first fetch of up to 17 MB is not either, for any client); librdkafka
fetches in a thread of its own, overlapping the decode, which is how it is used. confluent-kafka is
optional (the ``bench`` extra): without it those figures are null and ``confluent_kafka`` says why.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Iterator

import torch
from kafka import KafkaConsumer, KafkaProducer

from benchmarks import progress
from consumers.batch_consumer import BatchConsumer
from consumers.connection import KafkaConnection
from consumers.wire import WireLimits, decode_batch, encode_batch
from daemon.service.embedded import EmbeddedKafka

_log = progress("ingest")
# the embedded broker holds a new group's join for half the session timeout (23 s at the clients' default
# 45 s); the join is outside the clock, so a short session only makes the bench quicker
SHORT_SESSION = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=600, help="batches in the topic (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=100, help="28x28 images per batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="reads of the whole topic (default: %(default)s)")
    parser.add_argument("--pure-python", action="store_true",
                        help="check CRCs in pure Python, as kafka-python does without the crc32c extension")


def _timed(records: Iterator[tuple[bytes, Any]], messages: int, decode: bool) -> tuple[float, int]:
    """Seconds from the first record to the ``messages``-th (polls in between included) and the bytes read;
    with ``decode``, each record also goes through ``decode_batch`` as the daemon's would."""
    limits, size, started = WireLimits(), 0, None
    for got, (value, headers) in enumerate(records, 1):
        if started is None:
            started = time.perf_counter()
        if decode:
            decode_batch(value, headers, limits)
        size += len(value)
        if got >= messages:
            break
    return time.perf_counter() - started, size


def _read(address: str, topic: str, group: str, messages: int, decode: bool) -> tuple[float, int]:
    consumer = KafkaConsumer(topic, bootstrap_servers=address, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, max_partition_fetch_bytes=17 * 2**20,
                             fetch_max_bytes=64 * 2**20, **SHORT_SESSION)

    def records() -> Iterator[tuple[bytes, Any]]:
        while True:
            for batch in consumer.poll(timeout_ms=1000).values():
                yield from ((r.value, r.headers) for r in batch)

    try:
        return _timed(records(), messages, decode)
    finally:
        consumer.close()


def _read_filial(address: str, topic: str, group: str, messages: int, decode: bool) -> tuple[float, int]:
    """kafka-python as the daemon configures it: the daemon's own consumer (no checkpoint to check against)."""
    consumer = BatchConsumer(KafkaConnection(bootstrap=address), topic, group, SHORT_SESSION["session_timeout_ms"])

    def records() -> Iterator[tuple[bytes, Any]]:
        while True:
            yield from ((r.value, r.headers) for r in consumer.poll(timeout_ms=1000))

    try:
        return _timed(records(), messages, decode)
    finally:
        consumer.close()


def confluent_problem() -> str | None:
    """Why confluent-kafka cannot be read with here, or None."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        return f"confluent-kafka is not installed ({exc}); pip install 'filial[bench]'"
    return None


def _read_confluent(address: str, topic: str, group: str, messages: int, decode: bool) -> tuple[float, int]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": address, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "check.crcs": True,
                         "session.timeout.ms": SHORT_SESSION["session_timeout_ms"], "heartbeat.interval.ms": 1000,
                         "max.partition.fetch.bytes": 17 * 2**20, "fetch.max.bytes": 64 * 2**20})
    consumer.subscribe([topic])

    def records() -> Iterator[tuple[bytes, Any]]:
        while True:
            message = consumer.poll(1.0)  # one at a time: consume(n) would wait for n (or its timeout)
            if message is None:
                continue
            if message.error():
                raise RuntimeError(f"confluent-kafka: {message.error()}")
            yield message.value(), message.headers()

    try:
        return _timed(records(), messages, decode)
    finally:
        consumer.close()


READERS = {"kafka_python": _read, "kafka_python_filial": _read_filial, "confluent_kafka": _read_confluent}


def main(args: argparse.Namespace) -> dict:
    import kafka.record.util as kafka_util

    if args.pure_python:  # the checksum function is bound as a default argument when kafka-python loads
        kafka_util.calc_crc32c.__defaults__ = (kafka_util.crc32c_py,)
    extension = kafka_util.calc_crc32c.__defaults__[0] is not kafka_util.crc32c_py
    x = torch.randint(0, 256, (args.rows, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    value, headers = encode_batch(x, torch.randint(0, 10, (args.rows,)), "s", "image", "b")
    with EmbeddedKafka() as broker:
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all", max_request_size=17 * 2**20)
        for _ in range(args.messages):
            producer.send("ingest", value=value, headers=headers)
        producer.flush()
        producer.close()
        _log(f"{args.messages} messages of {len(value)} bytes in the topic; crc32c extension: {extension}")
        problem = confluent_problem()
        clients = [c for c in READERS if c != "confluent_kafka" or problem is None]
        rates = {(c, kind): [] for c in clients for kind in ("consume", "consume_decode")}
        for i in range(args.repeats):  # interleaved, so a slow spell of the machine hits every client
            for client, kind in rates:
                seconds, size = READERS[client](broker.address, "ingest", f"g{i}-{client}-{kind}", args.messages,
                                                kind != "consume")
                rates[client, kind].append(size / seconds / 1e6)
                _log(f"[{i + 1}/{args.repeats}] {client} {kind}: {rates[client, kind][-1]:.1f} MB/s")
        if problem:
            _log(f"confluent-kafka not measured: {problem}")
    best = {key: round(max(values), 1) for key, values in rates.items()}
    return {"bench": "ingest", "ingest_mb_per_s": best["kafka_python", "consume_decode"],
            "consume_mb_per_s": best["kafka_python", "consume"], "crc32c_extension": extension,
            "by_client": {c: {kind: best.get((c, kind)) for kind in ("consume", "consume_decode")} for c in READERS},
            "confluent_kafka": problem or "measured (check.crcs on)",
            "messages": args.messages, "message_bytes": len(value), "repeats": args.repeats}
