"""Learners' contributions to the merge leader (issue 13; README, "Scaling out").

With several learners, what a single daemon trains directly on its served model becomes each
learner's contribution: its served model as it learned since the version it follows, with the
held-out and replay rows of its slices, so the leader merges it through the same gate (and judges
and consolidates on those slices) as it merges its own children. One record per learner, replaced
at each of its merge ticks:

``{p}:contributions`` HASH learner -> JSON meta (``learner``, ``version``: the served version the
weights build on, ``samples``, ``slices``, ``architecture``, ``created_at``, ``sha256``);
``{p}:contribution:{learner}`` STRING safetensors: ``model.<param>`` and, per slice,
``heldout.<slice>.x|y`` and ``replay.<slice>.x|y`` (slice names come from the meta, never parsed
from keys). Both are written in one transaction; the sha256 ties them together.
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

Sets = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StoredContribution:
    learner: str
    version: int
    samples: int
    architecture: dict[str, Any]
    state: dict[str, torch.Tensor]
    heldout: Sets
    replay: Sets


def encode(state: dict[str, torch.Tensor], heldout: Sets, replay: Sets) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.contiguous() for k, v in state.items()}
    for kind, sets in (("heldout", heldout), ("replay", replay)):
        for name, (x, y) in sets.items():
            tensors[f"{kind}.{name}.x"], tensors[f"{kind}.{name}.y"] = x.contiguous(), y.contiguous()
    return tensors


class ContributionStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def write(self, learner: str, version: int, samples: int, architecture: dict[str, Any],
              state: dict[str, torch.Tensor], heldout: Sets, replay: Sets) -> None:
        blob = st_save(encode(state, heldout, replay))
        meta = {"learner": learner, "version": version, "samples": samples, "architecture": architecture,
                "slices": sorted(set(heldout) | set(replay)), "heldout": sorted(heldout), "replay": sorted(replay),
                "created_at": utc_now(), "sha256": sha256_hex(blob)}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.contribution(learner), blob)
            pipe.hset(self.keys.contributions, learner, json.dumps(meta))
            pipe.execute()

    def read_all(self, exclude: str | None = None) -> list[StoredContribution]:
        """Every other learner's latest contribution (one whose data does not match its meta, e.g.
        caught between two writes, is skipped: the next merge reads it again)."""
        out = []
        for learner, raw in sorted(self.client.hgetall(self.keys.contributions).items()):
            learner = learner.decode()
            if learner == exclude:
                continue
            meta = json.loads(raw)
            blob = self.client.get(self.keys.contribution(learner))
            if blob is None or sha256_hex(blob) != meta["sha256"]:
                continue
            t = st_load(blob)
            out.append(StoredContribution(
                learner, int(meta["version"]), int(meta["samples"]), meta["architecture"],
                {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")},
                {s: (t[f"heldout.{s}.x"], t[f"heldout.{s}.y"]) for s in meta["heldout"]},
                {s: (t[f"replay.{s}.x"], t[f"replay.{s}.y"]) for s in meta["replay"]}))
        return out

    def remove(self, learner: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.contribution(learner))
            pipe.hdel(self.keys.contributions, learner)
            pipe.execute()
