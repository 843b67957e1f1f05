"""All-or-nothing batches: an in-memory snapshot of the engine's state, and the rollback to it.

``Engine.process`` snapshots before the learner runs and, if the learner raises, puts the
snapshot back, so a batch that fails leaves the model tree, buffers, counters and random state
as they were (the service then retries or quarantines it: docs/architecture.md, "Poison batches").

The snapshot is the checkpoint codec's (``daemon.engine.state.encode``), so it covers everything a
restart would; tensors are cloned because the learner updates weights and full reservoirs in
place. Chosen over staging the learner's changes (every learner path would have to stage) and
over restoring the durable checkpoint (it would re-apply every batch since and rewind the
consumer). Cost: one copy of the state per batch (0.4 ms for a 3.9 MB state against 189 ms for
the batch, docs/architecture.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from daemon.engine.state import EngineState, decode, encode
from daemon.engine.tree import ModelTree
from daemon.learn.replay import SliceBuffers


@dataclass(frozen=True)
class Snapshot:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def snapshot(state: EngineState) -> Snapshot:
    meta, tensors = encode(state)
    return Snapshot(copy.deepcopy(meta), {k: v.clone() for k, v in tensors.items()})


def rolled_back(snap: Snapshot, current: EngineState, device: torch.device) -> EngineState:
    """The state as it was at ``snap``, decoded into a fresh one so nothing the failed batch added (a
    child, a slice's buffers) survives; what the codec does not save (settings-derived thresholds,
    the last merge signature, other learners' rows, which a batch does not change) is carried over
    from ``current``."""
    fresh = EngineState(tree=ModelTree(), buffers=SliceBuffers(current.buffers.replay_capacity,
                                                               current.buffers.heldout_capacity),
                        thresholds=current.thresholds, generator=torch.Generator())
    decode(snap.meta, snap.tensors, fresh, device)
    fresh.last_merge_signature = current.last_merge_signature
    fresh.buffers.others = current.buffers.others
    return fresh
