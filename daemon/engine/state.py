"""The engine's state as plain data, and its checkpoint codec (JSON metadata + named tensors).

Everything the learner and the merger change lives in :class:`EngineState`; the engine facade
guards it with one lock. :func:`encode` / :func:`decode` turn it into what
``zoo_store.checkpoints`` stores (safetensors tensors and a JSON document).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from daemon.engine.records import Counters, MergeOutcome
from daemon.engine.tree import ModelTree, Node
from daemon.learn.merging.confirm import Confirmation
from daemon.learn.replay import SliceBuffers
from daemon.learn.policy import Thresholds
from daemon.learn.supersession import SliceProfile


@dataclass
class PendingCandidate:
    """A rejected merge's candidate that was better but not yet significantly (:mod:`daemon.learn.merging.confirm`):
    the outcome to publish once confirmed, the version it was judged against, its evidence, and the
    candidate in a model (built on its first look)."""
    outcome: MergeOutcome
    served_version: int
    confirmation: Confirmation
    model: torch.nn.Module | None = None


@dataclass
class PerVersion:
    """Supersession's measurements in the published version's terms (:mod:`daemon.learn.supersession`)."""
    profiles: dict[str, SliceProfile] = field(default_factory=dict)  # slice -> its held-out rows' profile
    # slice -> its latest consecutive batches under ``min_spawn_rows``: (predicted, labels, features), judged
    # together once they add up to that many rows
    small_batches: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class EngineState:
    tree: ModelTree
    buffers: SliceBuffers
    thresholds: Thresholds
    generator: torch.Generator
    counters: Counters = field(default_factory=Counters)
    served_version: int | None = None
    base_version: int | None = None
    # the weights task vectors are taken against; only ever replaced, never written in place
    base_state: dict[str, torch.Tensor] | None = None
    # the weights of the served version followers hold; the root model keeps learning past them
    published_state: dict[str, torch.Tensor] | None = None
    bootstrap_batches_seen: int = 0
    bootstrap_rows_seen: int = 0
    bootstrapped: bool = False  # the first model is complete (published, or being published)
    prequential: dict[str, list[float]] = field(default_factory=dict)  # slice -> [correct, seen]
    last_merge_signature: tuple = ()  # (child id, updates) of the last merge attempt
    # continual-learning bookkeeping (daemon.learn.continual): the batch count at each slice's latest
    # batch, and each slice's [held-out accuracy, batch count] when a published version last learned it
    slice_last_batch: dict[str, int] = field(default_factory=dict)
    learned: dict[str, list[float]] = field(default_factory=dict)
    # the false-alarm rate ``thresholds.kl`` was calibrated at; None: it is the kl_threshold setting
    kl_calibrated_rate: float | None = None
    # a merge candidate held for confirmation on fresh rows (merge.confirm_alpha); never checkpointed:
    # after a restart the next merge builds a new candidate
    pending: PendingCandidate | None = field(default=None, repr=False)
    # slice -> [the older slice its latest batches relabel, how many batches in a row]
    # (daemon.learn.supersession: superseded at CONFIRMING_BATCHES)
    contradictions: dict[str, list] = field(default_factory=dict)
    # what supersession keeps per published version (derived, never checkpointed; dropped when another is adopted)
    _per_version: PerVersion = field(default_factory=lambda: PerVersion(), repr=False)
    _per_version_of: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # ``published_state`` in a model, and the dict it was loaded from (derived, never checkpointed)
    _published_model: torch.nn.Module | None = field(default=None, repr=False)
    _published_model_of: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def published_model(self) -> torch.nn.Module:
        """The published version in a model, in whose features the served model's drift is measured:
        what followers hold, and it changes only when a version is adopted, so its fingerprint is
        refit then and not after every update of the learning root (whose features move with each
        batch). Before a first version, the root's own model."""
        root = self.root
        if self.published_state is None:
            return root.model
        if self._published_model_of is not self.published_state:  # replaced, never written in place
            if self._published_model is None:
                device = next(root.model.parameters()).device
                self._published_model = root.architecture.build_with(self.published_state, device)
            else:
                self._published_model.load_state_dict(self.published_state)
            self._published_model.eval()
            self._published_model_of = self.published_state
        return self._published_model

    def per_version(self) -> PerVersion:
        """What supersession measured under the published version, kept until another version is adopted
        (``published_state`` is replaced then, never written in place)."""
        if self._per_version_of is not self.published_state:
            self._per_version, self._per_version_of = PerVersion(), self.published_state
        return self._per_version

    def fresh_slices(self) -> set[str]:
        """Slices with batches that no published version has learned yet."""
        return {s for s, b in self.slice_last_batch.items() if s not in self.learned or b > self.learned[s][1]}

    def known_slices(self) -> set[str]:
        """Every slice name the state holds something for (buffers or bookkeeping)."""
        return (set(self.slice_last_batch) | set(self.buffers.replay) | set(self.buffers.heldout)
                | set(self.prequential))

    def forget_slice(self, name: str) -> None:
        """Drop what is held per slice (evicted at ``learner.max_slices``, or superseded): its buffers,
        prequential, continual and supersession bookkeeping, and its name in the served model's slice
        list. Node lineage (a child's ``slice``) stays: it is history, bounded by ``max_children``."""
        for per_slice in (self.buffers.replay, self.buffers.heldout, self.prequential, self.slice_last_batch,
                          self.learned, self.contradictions, self._per_version.profiles,
                          self._per_version.small_batches):
            per_slice.pop(name, None)
        if self.root is not None and name in self.root.slices:
            self.root.slices.remove(name)

    @property
    def root(self) -> Node | None:
        return self.tree.root


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def encode(state: EngineState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tree_meta, tensors = state.tree.to_checkpoint()
    buf_tensors, buf_meta = state.buffers.to_tensors()
    tensors.update(buf_tensors)
    if state.base_state is not None:
        tensors.update({f"base.{k}": v for k, v in state.base_state.items()})
    if state.published_state is not None:  # often the very tensors of base_state: safetensors wants copies
        tensors.update({f"published.{k}": v.clone() for k, v in state.published_state.items()})
    tensors["rng"] = state.generator.get_state()
    meta = {
        "tree": tree_meta, "buffers": buf_meta, "counters": asdict(state.counters),
        "served_version": state.served_version, "base_version": state.base_version,
        "bootstrap_batches_seen": state.bootstrap_batches_seen,
        "bootstrap_rows_seen": state.bootstrap_rows_seen, "bootstrapped": state.bootstrapped,
        "prequential": state.prequential, "kl_threshold": state.thresholds.kl,
        "kl_calibrated_rate": state.kl_calibrated_rate,
        "slice_last_batch": state.slice_last_batch, "learned": state.learned,
        "contradictions": state.contradictions,
    }
    return meta, tensors


def decode(meta: dict[str, Any], tensors: dict[str, torch.Tensor], state: EngineState,
           device: torch.device) -> None:
    """Load a checkpoint into ``state`` (whose buffers and thresholds carry the settings). The
    checkpoint's KL threshold is not applied here: the settings win unless it was calibrated under
    the same setting (the engine decides, :meth:`daemon.engine.engine.Engine.restore`)."""
    state.tree = ModelTree.from_checkpoint(meta["tree"], tensors, device)
    state._published_model, state._published_model_of = None, None
    state.buffers.load_tensors(tensors, meta["buffers"])
    base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
    state.base_state = base or None
    published = {k[10:]: v for k, v in tensors.items() if k.startswith("published.")}
    # a checkpoint from before the served model kept learning: it served its root's weights
    state.published_state = published or (cpu_state(state.tree.root.model)
                                           if state.tree.root is not None and meta["served_version"] else None)
    state.generator.set_state(tensors["rng"])
    state.counters = Counters(**meta["counters"])
    state.served_version = meta["served_version"]
    state.base_version = meta["base_version"]
    state.bootstrap_batches_seen = meta["bootstrap_batches_seen"]
    state.bootstrap_rows_seen = meta.get("bootstrap_rows_seen", 0)  # checkpoints before bootstrap_rows
    state.bootstrapped = meta.get("bootstrapped", meta["served_version"] is not None)
    state.prequential = {k: list(v) for k, v in meta["prequential"].items()}
    state.slice_last_batch = dict(meta.get("slice_last_batch", {}))  # absent before the CL metrics existed
    state.learned = {k: list(v) for k, v in meta.get("learned", {}).items()}
    state.contradictions = {k: list(v) for k, v in meta.get("contradictions", {}).items()}
    state._per_version, state._per_version_of = PerVersion(), None
