"""Durable checkpoints of the engine's own state (docs/architecture.md, invariant 1: nothing lost).

A checkpoint is two keys written in one transaction: JSON metadata (offsets applied, counters,
tree structure, a sequence number and the tensors' sha256) and one safetensors blob with every
tensor (model weights, replay and held-out buffers). Kafka offsets are committed only after
:meth:`CheckpointStore.save` returns.

Next to it, :class:`InFlightMarker`: the batch being applied right now, written before the engine
takes it and deleted after. A process that dies inside a batch (out of memory, a native crash)
leaves the marker behind; the next start reads it and can tell a batch that keeps killing the
process from one that was merely interrupted. And :class:`DeadLetterLog`: the dead letters sent
since the last checkpoint, so a message re-read after a crash is not dead-lettered twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
import torch
from safetensors.torch import load as st_load, save as st_save

from zoo_store.keys import Keys
from zoo_store.models import sha256_hex, utc_now


class CorruptCheckpoint(Exception):
    pass


class CheckpointStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
             owned_offsets: dict[str, int] | None = None) -> int:
        """Write the checkpoint; ``owned_offsets`` (the partitions this learner owns now, next offset to
        apply) go to the group's shared ``{p}:applied`` in the same transaction, so a partition's next
        owner resumes past everything a checkpoint holds even if the Kafka commit never happened."""
        blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        seq = int(meta.get("seq", 0))
        record = {**meta, "seq": seq, "saved_at": utc_now(), "tensors_sha256": sha256_hex(blob),
                  "tensors_bytes": len(blob)}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.checkpoint_tensors, blob)
            pipe.set(self.keys.checkpoint_meta, json.dumps(record))
            if owned_offsets:
                pipe.hset(self.keys.applied_offsets, mapping=owned_offsets)
            pipe.execute()
        return len(blob)

    def shared_offset(self, partition: str) -> int | None:
        """The next offset to apply of ``partition`` as its last owner's checkpoint holds it."""
        raw = self.client.hget(self.keys.applied_offsets, partition)
        return int(raw) if raw is not None else None

    def forget_shared_offset(self, partition: str) -> None:
        self.client.hdel(self.keys.applied_offsets, partition)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.checkpoint_meta)
            pipe.get(self.keys.checkpoint_tensors)
            raw_meta, blob = pipe.execute()
        if raw_meta is None:
            return None
        meta = json.loads(raw_meta)
        if blob is None or sha256_hex(blob) != meta.get("tensors_sha256"):
            raise CorruptCheckpoint("checkpoint tensors are missing or do not match their sha256")
        return meta, st_load(blob)


@dataclass(frozen=True)
class InFlight:
    source: str    # topic:partition:offset
    crashes: int   # consecutive crashes it was in flight at before this attempt
    since: str     # when this attempt began (UTC)


class InFlightMarker:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.checkpoint_inflight

    def mark(self, source: str, crashes: int) -> None:
        self.client.set(self.key, json.dumps({"source": source, "crashes": crashes, "since": utc_now()}))

    def clear(self) -> None:
        self.client.delete(self.key)

    def read(self) -> InFlight | None:
        raw = self.client.get(self.key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return InFlight(str(doc["source"]), int(doc["crashes"]), str(doc.get("since", "")))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as no marker (the worst case is one more crash)


class DeadLetterLog:
    """Sources dead-lettered (the broker acknowledged) that no checkpoint covers yet: after a crash
    they are re-read from the checkpoint's offsets, and this says they were already sent. A send
    is noted before it starts (:meth:`sending`): a crash between the broker's append and
    :meth:`record` leaves the note, and the restart reads the dead-letter topic to learn whether the
    letter arrived (``DeadLetterProducer.delivered``) instead of sending it twice."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.checkpoint_dead_letters
        self.sending_key = keys.checkpoint_dead_letters_sending

    def sending(self, source: str, at_ms: int) -> None:
        self.client.hset(self.sending_key, source, str(at_ms))

    def record(self, source: str, reason: str) -> None:
        with self.client.pipeline(transaction=True) as tx:
            tx.hset(self.key, source, reason)
            tx.hdel(self.sending_key, source)
            tx.execute()

    def sources(self) -> set[str]:
        return {raw.decode() if isinstance(raw, bytes) else raw for raw in self.client.hkeys(self.key)}

    def unsure(self) -> dict[str, int]:
        """Sends begun and never recorded (source -> when each began, ms)."""
        raw = self.client.hgetall(self.sending_key)
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    def trim(self, applied_offsets: dict[str, int]) -> None:
        """Forget the sources a checkpoint now covers (below its applied offset of their partition)."""
        for key, sources in ((self.key, self.sources()), (self.sending_key, set(self.unsure()))):
            covered = [source for source in sources if _covered(source, applied_offsets)]
            if covered:
                self.client.hdel(key, *covered)


def _covered(source: str, applied_offsets: dict[str, int]) -> bool:
    partition, _, offset = source.rpartition(":")
    return partition in applied_offsets and offset.isdigit() and int(offset) < applied_offsets[partition]
