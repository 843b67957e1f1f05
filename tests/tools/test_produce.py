"""The producer: each phase's share goes to the topic as wire-format batches with ids, in order,
and what arrives decodes to exactly what was sent (real embedded broker, no mocks)."""

from __future__ import annotations

import pytest
import torch
from kafka import KafkaConsumer

from consumers.connection import KafkaConnection
from consumers.wire import WireLimits, decode_batch
from tools.datasets import load_dataset
from tools.produce import produce_phases
from tools.scenarios import parse_phase, split_into_phases

pytestmark = pytest.mark.integration


def test_phases_arrive_as_decodable_batches_with_ids(kafka, unique):
    topic = f"{unique}.in"
    kafka.create_topics({topic: 1})
    data = load_dataset("digits")
    phases = [parse_phase("upright=identity"), parse_phase("rot90=rotate:90")]
    progress = []
    report = produce_phases(KafkaConnection(bootstrap=kafka.address), topic, data, phases, batch_size=50,
                            samples_per_phase=120, seed=3, run_id="r1",
                            on_batch=lambda phase, i, total: progress.append((phase, i, total)))
    assert (report.batches, report.samples) == (6, 240)
    assert report.per_phase == {"upright": 3, "rot90": 3}
    assert report.batch_ids == [f"r1-{p}-{i}" for p in ("upright", "rot90") for i in range(3)]
    assert progress == [(p, i, 3) for p in ("upright", "rot90") for i in (1, 2, 3)]

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka.address, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    try:
        records = []
        for record in consumer:
            records.append(record)
            if len(records) == report.batches:
                break
    finally:
        consumer.close()
    batches = [decode_batch(r.value, r.headers, WireLimits()) for r in records]
    assert [b.batch_id for b in batches] == report.batch_ids
    assert [b.slice for b in batches] == ["upright"] * 3 + ["rot90"] * 3
    assert [r.key for r in records] == [b.slice.encode() for b in batches]  # keyed by slice: one partition each
    assert [len(b) for b in batches] == [50, 50, 20] * 2
    assert all(b.data_type == "image" and b.x.dtype == torch.uint8 for b in batches)
    # exactly the rows the phases cut, shifted as named, in order
    expected = split_into_phases(data, phases, seed=3, samples_per_phase=120)
    for k, (_, x, y) in enumerate(expected):
        got = batches[3 * k:3 * k + 3]
        assert torch.equal(torch.cat([b.x for b in got]), x) and torch.equal(torch.cat([b.y for b in got]), y)
