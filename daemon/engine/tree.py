"""The model tree: the served model (root) and its children, with lineage and fingerprints.

A node keeps its model, the slice it was spawned for, its reference inputs and their
fingerprint in the node's own feature space (so "the nearest child" is the child to whose own
training data the batch looks most alike), and counters. The tree is plain state: the engine
changes it under its lock; checkpoints serialise it with :meth:`ModelTree.to_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from daemon.engine.seeding import seeded
from daemon.learn.drift import FeatureKL
from daemon.learn.models import Architecture
from daemon.learn.training import embed, features_and_logits, model_input

Status = Literal["served", "active", "retired"]
ROOT = "root"

# A fingerprint is refitted on at most this many of the reference's rows (evenly spread over it; the
# default reference_size is 512, so all of them). A child's is refit after each of its updates, in its
# own moving features; the served model's lives in the published version's features and is refit only
# when a version is adopted (``EngineState.published_model``): the batch and the reference are then
# embedded by the same frozen weights, where a refit kept from the learning model's features of a few
# updates ago scored the same in-distribution batches 2-5x higher. Fewer rows are cheaper but noisier:
# at 256, the KL of batches of 100 stayed within one draw's spread of the 512-row figure (0.08 vs 0.09
# in distribution), yet `filial bench cl`'s stationary control (batches of 50) raised 2 and 1 false
# drift events on seeds 1 and 2 where 512 rows raise none.
FINGERPRINT_ROWS = 512


@dataclass
class Node:
    node_id: str
    parent: str | None
    slice: str
    data_type: str
    architecture: Architecture
    model: nn.Module
    created_at: str
    reference_x: torch.Tensor
    fingerprint: FeatureKL | None  # drift detector on its reference; None until it has one
    status: Status = "active"
    updates: int = 0
    samples: int = 0
    base_version: int | None = None
    slices: list[str] = field(default_factory=list)
    published_updates: int = 0       # compact children: ``updates`` when last published on their line
    spawn_method: str = "copy"       # how it inherited: copy | hkt | scratch (daemon.learn.policy.spawn_method)

    def in_weight_space_of(self, root: "Node") -> bool:
        """Whether its task vector against the served model's base means anything: a same-size
        copy of the served weights merges in weight space; compact or scratch children distil."""
        return self.architecture == root.architecture and self.spawn_method == "copy"

    def refresh_fingerprint(self, features_of: nn.Module | None = None) -> None:
        """Refit on at most :data:`FINGERPRINT_ROWS` of the reference's rows, in the features of
        ``features_of`` (default: the node's model as it is now; features move with every update).
        The served model's fingerprint is fit in the published version's features
        (:meth:`daemon.engine.state.EngineState.published_model`)."""
        stride = -(-len(self.reference_x) // FINGERPRINT_ROWS)
        rows = self.reference_x[::stride] if stride > 1 else self.reference_x
        model = features_of if features_of is not None else self.model
        self.fingerprint = FeatureKL.fit(embed(model, model_input(rows, self.data_type)))

    def describe_lineage(self) -> dict:
        """The node as a manifest's lineage entry."""
        return {"node_id": self.node_id, "parent": self.parent, "slice": self.slice, "created_at": self.created_at,
                "architecture": self.architecture.model_dump()}

    def describe(self) -> dict:
        return {"node_id": self.node_id, "parent": self.parent, "slice": self.slice, "slices": self.slices,
                "data_type": self.data_type, "architecture": self.architecture.model_dump(),
                "created_at": self.created_at, "status": self.status, "updates": self.updates,
                "samples": self.samples, "base_version": self.base_version,
                "published_updates": self.published_updates, "spawn_method": self.spawn_method,
                "reference_rows": len(self.reference_x)}


@dataclass
class ModelTree:
    nodes: dict[str, Node] = field(default_factory=dict)
    next_child: int = 1

    @property
    def root(self) -> Node | None:
        return self.nodes.get(ROOT)

    def active_children(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.status == "active"]

    def new_child_id(self) -> str:
        node_id = f"c{self.next_child}"
        self.next_child += 1
        return node_id

    def add(self, node: Node) -> None:
        self.nodes[node.node_id] = node

    def nearest_child(self, x_model: torch.Tensor, data_type: str,
                      y: torch.Tensor | None = None) -> tuple[Node | None, float | None, float | None]:
        """The active child whose fingerprint the batch is closest to (KL in the child's own features),
        that KL, and (given labels ``y``) its accuracy on the batch, from the same forward pass."""
        best, best_kl, best_acc = None, None, None
        for child in self.active_children():
            if child.data_type != data_type:
                continue
            features, logits = features_and_logits(child.model, x_model)
            kl = child.fingerprint.score(features)
            if best_kl is None or kl < best_kl:
                best, best_kl = child, kl
                best_acc = None if y is None else float((logits.argmax(1) == y).float().mean())
        return best, best_kl, best_acc

    def describe(self) -> dict:
        return {"nodes": [n.describe() for n in self.nodes.values()]}

    # --- checkpoints -------------------------------------------------------------------------
    def to_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for node in self.nodes.values():
            for name, t in node.model.state_dict().items():
                tensors[f"node.{node.node_id}.w.{name}"] = t
            tensors[f"node.{node.node_id}.ref_x"] = node.reference_x
            if node.fingerprint is not None:
                tensors.update(node.fingerprint.to_tensors(f"node.{node.node_id}.fp"))
        return {"next_child": self.next_child, **self.describe()}, tensors

    @classmethod
    def from_checkpoint(cls, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> "ModelTree":
        tree = cls(next_child=meta["next_child"])
        for d in meta["nodes"]:
            prefix = f"node.{d['node_id']}."
            arch = Architecture.model_validate(d["architecture"])
            with seeded(0):  # the checkpoint's weights are loaded over these
                model = arch.build()
            model.load_state_dict({k[len(prefix) + 2:]: v for k, v in tensors.items()
                                   if k.startswith(prefix + "w.")})
            model.to(device).eval()
            tree.add(Node(node_id=d["node_id"], parent=d["parent"], slice=d["slice"], data_type=d["data_type"],
                          architecture=arch, model=model, created_at=d["created_at"],
                          reference_x=tensors[prefix + "ref_x"],
                          fingerprint=(FeatureKL.from_tensors(tensors, prefix + "fp")
                                       if prefix + "fp.count" in tensors else None),
                          status=d["status"], updates=d["updates"], samples=d["samples"],
                          base_version=d["base_version"], slices=list(d["slices"]),
                          published_updates=d.get("published_updates", 0),
                          spawn_method=d.get("spawn_method", "copy")))
        return tree
