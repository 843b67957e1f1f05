"""The producer side: stream a dataset into the topic as wire-format batches, phase by phase."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from kafka import KafkaProducer

from consumers.connection import KafkaConnection
from consumers.wire import encode_batch
from tools.datasets import Dataset
from tools.scenarios import Phase, split_into_phases

log = logging.getLogger("filial.produce")


@dataclass
class ProduceReport:
    batches: int = 0
    samples: int = 0
    per_phase: dict[str, int] = field(default_factory=dict)
    batch_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def produce_phases(connection: KafkaConnection, topic: str, dataset: Dataset, phases: list[Phase], *,
                   batch_size: int = 128, rate: float | None = None, samples_per_phase: int | None = None,
                   seed: int = 0, run_id: str | None = None,
                   on_batch: Callable[[str, int, int], None] | None = None) -> ProduceReport:
    """Send each phase's share of ``dataset`` as batches; ``rate`` caps batches per second."""
    run_id = run_id or uuid.uuid4().hex[:8]
    producer = KafkaProducer(acks="all", linger_ms=5, max_request_size=32 * 1024 * 1024,
                             **connection.client_kwargs())
    report = ProduceReport()
    started = time.monotonic()
    try:
        for phase, x, y in split_into_phases(dataset, phases, seed=seed, samples_per_phase=samples_per_phase):
            total = (len(y) + batch_size - 1) // batch_size
            for i, start in enumerate(range(0, len(y), batch_size)):
                batch_id = f"{run_id}-{phase.name}-{i}"
                yb = y[start:start + batch_size]
                value, headers = encode_batch(x[start:start + batch_size], yb, phase.name,
                                              dataset.data_type, batch_id)
                producer.send(topic, key=phase.name.encode(), value=value, headers=headers)  # one slice, one partition
                report.batches += 1
                report.samples += len(yb)
                report.per_phase[phase.name] = report.per_phase.get(phase.name, 0) + 1
                report.batch_ids.append(batch_id)
                if on_batch:
                    on_batch(phase.name, i + 1, total)
                if rate:
                    time.sleep(max(0.0, report.batches / rate - (time.monotonic() - started)))
            producer.flush()
            log.info("phase %s: %d batches sent", phase.name, report.per_phase.get(phase.name, 0))
    finally:
        producer.flush()
        producer.close(timeout=10)
    report.seconds = time.monotonic() - started
    return report
