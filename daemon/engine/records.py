"""What the engine hands out: per-batch results, merge outcomes and releases to publish.

Plain values (dataclasses). The service logs, records and publishes them; it never reaches into
the engine's state to find out what happened.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from daemon.learn.continual import ContinualMetrics
from daemon.learn.fingerprint import Fingerprint
from daemon.learn.models import Architecture
from daemon.learn.merging.gate import GateVerdict


@dataclass
class Counters:
    batches: int = 0
    samples: int = 0
    duplicates_skipped: int = 0
    drift_events: int = 0
    children_spawned: int = 0
    children_retrained: int = 0
    served_updates: int = 0           # batches the served model learned from after bootstrap
    merges_accepted: int = 0
    merges_rejected: int = 0
    child_updates_since_merge: int = 0  # updates (a child's or the served model's) since the last merge


@dataclass(frozen=True)
class BatchResult:
    """What the engine did with one batch; the service logs and records it."""
    slice: str
    rows: int
    action: str
    reason: str
    kl: float | None
    accuracy: float | None
    drift: bool
    child: str | None = None
    nearest_kl: float | None = None
    publish_bootstrap: bool = False
    merge_due: bool = False
    seconds: float = 0.0
    evicted_slice: str | None = None  # the least recently seen slice this batch's new slice displaced (max_slices)
    superseded_slice: str | None = None  # the slice whose labels this batch's slice replaced (daemon.learn.supersession)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (daemon.engine.stages)

    def record(self) -> dict[str, Any]:
        """The telemetry entry (the stage timings go to Prometheus, ``filial_stage_seconds``, instead)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()
                if k != "stages"}


@dataclass
class MergeOutcome:
    accepted: bool
    reason: str
    state: dict[str, torch.Tensor] | None
    children: list[str]
    base_version: int | None
    served_version: int | None
    served_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    plan: dict[str, Any] | None = None
    verdict: GateVerdict | None = None
    seconds: float = 0.0
    # compact children after learning back from the candidate (distillation's second direction),
    # with the ``updates`` count they had when snapshotted: adopted only if still unchanged
    distilled_children: dict[str, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    # the served model's weights when the merge was snapshotted: what it learned since is kept on adoption
    working_state: dict[str, torch.Tensor] | None = None
    # the served model keeps learning from the candidate even when the gate rejects it (the gate
    # decides what followers see, not what the learner builds on): set when the candidate scores at
    # least as well as the served model as it was trained, on the selection rows
    working_takes_candidate: bool = False
    # held-out rows of slices other learners contributed (not in this engine's buffers): the release's
    # metrics cover them too
    foreign_heldout: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # a candidate rejected earlier for a gain not yet significant, confirmed since on fresh rows
    # (daemon.learn.merging.confirm): accepted without a merge computed now
    confirmed: bool = False
    # rejected, and held for confirmation on the next batches' fresh rows (daemon.learn.merging.confirm)
    held: bool = False
    # per-row correctness of the published version and of the candidate on the judge rows, by slice: the
    # gate's inputs, kept so a held candidate's confirmation starts from them (not in the record)
    judged: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "children": self.children,
                "base_version": self.base_version, "served_version": self.served_version,
                "served_metrics": self.served_metrics, "candidate_metrics": self.candidate_metrics,
                "plan": self.plan, "seconds": round(self.seconds, 3), "confirmed": self.confirmed,
                "held": self.held,
                "regressions": [asdict(r) for r in self.verdict.regressions] if self.verdict else [],
                "gate": asdict(self.verdict) if self.verdict else None}


@dataclass(frozen=True)
class Release:
    """A served-model state with everything its manifest needs, taken from the engine at one moment.

    ``metrics`` is held-out accuracy per slice of ``state``; ``parent_version`` the version served
    when it was taken (the publish id is derived from it, so a retried publish is the same one).
    """
    reason: str
    state: dict[str, torch.Tensor]
    architecture: Architecture
    parent_version: int | None
    base_version: int | None
    lineage: list[dict[str, Any]]
    metrics: dict[str, float]
    merge: dict[str, Any] | None = None
    continual: ContinualMetrics | None = None  # average accuracy, forgetting, BWT of this version
    batches: int = 0                           # the engine's batch count when it was taken
    data_type: str = "tabular"
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)  # per slice, in its features (zoo)


@dataclass(frozen=True)
class Contribution:
    """Another learner's served model as it learned since served ``version``, with its slices'
    rows: the merge leader merges it like a child in weight space, and judges and consolidates on
    those rows too (zoo_store/contributions.py carries it)."""
    learner: str
    version: int
    samples: int
    architecture: dict[str, Any]
    state: dict[str, torch.Tensor]
    heldout: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replay: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ChildRelease:
    """A child ready to publish as a zoo member on its own line (``{line}.{node_id}``)."""
    node_id: str
    updates: int
    architecture: Architecture
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    parent_version: int
    lineage: list[dict[str, Any]]
    slices: list[str] = field(default_factory=list)
    spawn_method: str = "copy"
    base_version: int | None = None
    data_type: str = "tabular"
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStatus:
    """Gauges for metrics and telemetry, copied out under the lock."""
    counters: Counters
    served_version: int | None
    prequential_accuracy: dict[str, float]
    children: dict[str, int]  # status -> count
