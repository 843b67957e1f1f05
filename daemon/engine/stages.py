"""Where one batch's time goes: seconds per named stage, summed over the batch.

The learner times its stages with one :class:`StageClock` per batch and hands the totals out in
:attr:`daemon.engine.records.BatchResult.stages`; the service adds its own (poll, decode) and
exports them all as ``filial_stage_seconds{stage}`` (a bounded label set: the names below).
Stages never nest: a stage's seconds are its own, so the totals add up to the batch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# the engine's stages, in the order a batch meets them
SNAPSHOT = "snapshot"            # the all-or-nothing copy of the state (daemon.engine.atomic)
SPLIT = "split"                  # train/held-out split and conversion to the model's input form
BOOTSTRAP = "bootstrap"          # training the first served model
OBSERVE = "observe"              # the served model's forward pass: prequential accuracy and KL
ROUTE = "route"                  # the active children's forward passes: nearest child, its accuracy
SUPERSEDE = "supersede"          # does the batch relabel an older slice (daemon.learn.supersession)
TRAIN_CHILDREN = "train_children"  # spawning or retraining a child
TRAIN_SERVED = "train_served"    # the served model learning the batch (train_served)
FINGERPRINT = "fingerprint"      # refitting a model's reference statistics after it learned
BUFFERS = "buffers"              # the slice's replay and held-out reservoirs
ENGINE_STAGES = (SNAPSHOT, SPLIT, BOOTSTRAP, OBSERVE, ROUTE, SUPERSEDE, TRAIN_CHILDREN, TRAIN_SERVED, FINGERPRINT,
                 BUFFERS)


class StageClock:
    """Accumulates wall seconds per stage: ``with clock(ROUTE): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
