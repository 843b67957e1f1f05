"""Zoo members as the serving layer holds them: a verified version's model, ready to run, with
the fingerprints and held-out accuracies that weigh it, and the immutable snapshot of the zoo a
request runs on.

A :class:`Member` is built once, beside the snapshot in use (:mod:`daemon.serve.loader`), and is
never changed afterwards: its model is in eval mode with gradients off, so any number of request
threads can run it at once. :class:`ZooSnapshot` groups the served model and the members; a
request takes one snapshot at its start and finishes on it whatever is swapped meanwhile.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping

import torch
from torch import nn

from daemon.learn.fingerprint import Fingerprint, decode_fingerprints
from daemon.learn.models import DEFAULT_FAMILY, Architecture

if TYPE_CHECKING:
    from zoo_store.follow import LoadedVersion

Kind = Literal["served", "member"]
# a built-in family's data type (the wire's data_type header), for model_input; custom: the caller's
FAMILY_DATA_TYPE = {family: data_type for data_type, family in DEFAULT_FAMILY.items()}


def known_metrics(metrics: Mapping[str, float | None]) -> dict[str, float]:
    """The held-out accuracies that were measured: None and NaN (no held-out rows) are unknown."""
    return {s: float(a) for s, a in metrics.items() if a is not None and not math.isnan(float(a))}


# eq=False: identity equality and hashing (a model and tensors have no useful value equality)
@dataclass(frozen=True, eq=False)
class Member:
    line: str
    version: int
    kind: Kind
    architecture: Architecture
    model: nn.Module                       # eval mode, requires_grad off; never trained here
    state: Mapping[str, torch.Tensor]      # the model's own tensors (shared, not copies)
    fingerprints: Mapping[str, Fingerprint] = field(default_factory=dict)   # slice -> in this model's features
    metrics: Mapping[str, float] = field(default_factory=dict)              # slice -> held-out accuracy (known only)
    slices: tuple[str, ...] = ()
    published_at: float | None = None      # the manifest's created_at, epoch seconds
    merge_plan: Mapping | None = None      # the training-time merge plan that made it (manifest merge.plan)

    @property
    def name(self) -> str:
        return f"{self.line}:v{self.version}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def data_type(self) -> str | None:
        """The wire data type of a built-in family; None for a custom factory (the request says)."""
        return FAMILY_DATA_TYPE.get(self.architecture.family)

    def same_shape(self, other: "Member") -> bool:
        """Same architecture, so the two can be merged in weight space tensor by tensor."""
        return self.architecture == other.architecture and all(
            k in other.state and other.state[k].shape == t.shape for k, t in self.state.items())

    @classmethod
    def build(cls, *, line: str, version: int, kind: Kind, architecture: Architecture | Mapping,
              state: Mapping[str, torch.Tensor], fingerprints: Mapping[str, Fingerprint] | None = None,
              metrics: Mapping[str, float | None] | None = None, slices=(), published_at: float | None = None,
              merge_plan: Mapping | None = None, device: str | torch.device = "cpu",
              adopt: bool = False) -> "Member":
        """A member from in-memory parts (an engine's model's state dict, a benchmark's model). The
        tensors are copied into a freshly built model, so the caller may go on training its own;
        ``adopt``: the model takes them instead (a version just loaded, which nothing else holds;
        :meth:`Architecture.build_with`). Raises ValueError when the state does not fit the architecture."""
        arch = architecture if isinstance(architecture, Architecture) else Architecture.model_validate(architecture)
        try:
            model = arch.build_with(state, adopt=adopt)
        except RuntimeError as exc:
            raise ValueError(f"{line} v{version}: weights do not fit {arch.family} {arch.params}: {exc}") from None
        model.to(device).eval().requires_grad_(False)
        dims = getattr(model.head, "in_features", None)     # the feature width, where the head says it
        wrong = [s for s, fp in (fingerprints or {}).items() if dims is not None and fp.dims != dims]
        if wrong:
            raise ValueError(f"{line} v{version}: fingerprints {wrong} are not in this model's {dims} features")
        return cls(line=line, version=version, kind=kind, architecture=arch, model=model,
                   state={k: t.detach() for k, t in model.state_dict().items()},
                   fingerprints=dict(fingerprints or {}), metrics=known_metrics(metrics or {}),
                   slices=tuple(slices), published_at=published_at,
                   merge_plan=merge_plan)

    @classmethod
    def from_loaded(cls, loaded: "LoadedVersion", device: str | torch.device = "cpu") -> "Member":
        """A member from a version the follower loaded and verified (weights and fingerprint)."""
        m = loaded.manifest
        fingerprints = {}
        if loaded.fingerprint is not None and m.fingerprint_slices:
            try:
                fingerprints = decode_fingerprints(loaded.fingerprint, list(m.fingerprint_slices))
            except KeyError as exc:
                raise ValueError(f"{m.line} v{m.version}: fingerprint lacks tensor {exc}") from None
        return cls.build(line=m.line, version=m.version, kind=m.kind, architecture=m.architecture,
                         state=loaded.state, fingerprints=fingerprints, metrics=m.metrics, slices=m.slices,
                         published_at=epoch_seconds(m.created_at),
                         merge_plan=(m.merge or {}).get("plan"), device=device, adopt=True)


def epoch_seconds(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, eq=False)
class ZooSnapshot:
    """What one request runs on: the served model and the zoo members, as loaded at ``loaded_at``.

    Immutable: a swap builds a new snapshot and replaces the reference, so a request that took
    this one finishes on it."""

    served: Member
    members: tuple[Member, ...] = ()
    loaded_at: float = field(default_factory=time.time)

    @property
    def all(self) -> tuple[Member, ...]:
        """The served model first, then the members: the order of every weight vector."""
        return (self.served, *self.members)

    def with_served(self, served: Member) -> "ZooSnapshot":
        return ZooSnapshot(served, self.members)

    def with_members(self, members: tuple[Member, ...]) -> "ZooSnapshot":
        return ZooSnapshot(self.served, members)
