"""Ingest: consume + decode MB/s of kafka-python as filial configures it, on a pre-filled topic of the
embedded broker (loopback), with the CRC-32C check in C (the ``crc32c`` extension) — and, with
``--pure-python``, as kafka-python runs without it.

Fills a topic with ``--messages`` batches of ``--rows`` MNIST-shaped uint8 images (the wire format of
``filial produce``), then reads them back ``--repeats`` times, each with a fresh consumer group: poll
only, and poll + ``consumers.wire.decode_batch`` (validation and safetensors decoding, what the daemon
does before training). Last line: one JSON object with ``ingest_mb_per_s`` (consume + decode, best of
the repeats), ``consume_mb_per_s`` and ``crc32c_extension``.
"""

from __future__ import annotations

import argparse
import time

import torch
from kafka import KafkaConsumer, KafkaProducer

from benchmarks import progress
from consumers.wire import WireLimits, decode_batch, encode_batch
from daemon.service.embedded import EmbeddedKafka

_log = progress("ingest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=600, help="batches in the topic (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=100, help="28x28 images per batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="reads of the whole topic (default: %(default)s)")
    parser.add_argument("--pure-python", action="store_true",
                        help="check CRCs in pure Python, as kafka-python does without the crc32c extension")


def _read(address: str, topic: str, group: str, messages: int, decode: bool) -> tuple[float, int]:
    consumer = KafkaConsumer(topic, bootstrap_servers=address, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, max_partition_fetch_bytes=17 * 2**20,
                             fetch_max_bytes=64 * 2**20)
    limits, got, size, started = WireLimits(), 0, 0, None
    try:
        while got < messages:
            records = consumer.poll(timeout_ms=1000)
            if started is None and records:
                started = time.perf_counter()
            for batch in records.values():
                for record in batch:
                    if decode:
                        decode_batch(record.value, record.headers, limits)
                    got += 1
                    size += len(record.value)
        return time.perf_counter() - started, size
    finally:
        consumer.close()


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
        rates: dict[str, list[float]] = {"consume": [], "consume_decode": []}
        for i in range(args.repeats):
            for kind in rates:
                seconds, size = _read(broker.address, "ingest", f"g{i}-{kind}", args.messages, kind != "consume")
                rates[kind].append(size / seconds / 1e6)
                _log(f"[{i + 1}/{args.repeats}] {kind}: {rates[kind][-1]:.1f} MB/s")
    return {"bench": "ingest", "ingest_mb_per_s": round(max(rates["consume_decode"]), 1),
            "consume_mb_per_s": round(max(rates["consume"]), 1), "crc32c_extension": extension,
            "messages": args.messages, "message_bytes": len(value), "repeats": args.repeats}
