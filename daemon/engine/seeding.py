"""Model construction that neither depends on nor disturbs the process-wide torch RNG.

Building a module draws its initial weights from torch's global generator, which every thread
shares: a merge thread building an evaluation model would shift the draws of the learner's next
spawn. Every model the engine builds goes through :func:`seeded`: under one lock, the global
generator is forked, seeded from the engine's seed and the node it is for, and restored
afterwards, so the same stream and seed give the same weights whatever else runs.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def node_seed(seed: int, node_id: str) -> int:
    """A stable per-node seed (``hash()`` of a str is salted per process; this is not)."""
    return (seed * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(node_id))) % (2 ** 62)
