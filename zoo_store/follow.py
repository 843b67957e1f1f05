"""The downstream SDK: follow a model line's versions and load verified weights.

    from zoo_store.follow import Follower
    follower = Follower.from_url("redis://localhost:6379/0", line="main", signing_key=b"...")
    for event in follower.events(from_version="latest"):
        manifest, state_dict = follower.load(event.version)   # sha256 + signature checked

Followers in other languages do the same from the key layout in ``zoo_store/keys.py``:
XREAD the events stream from ``{n}-0``, GET manifest and weights, check the sha256 (and the
HMAC when a key is configured) before loading the safetensors bytes.
"""

from __future__ import annotations

import threading
from typing import Iterator, Literal

import redis
import torch
from safetensors.torch import load as st_load

from zoo_store.connection import connect
from zoo_store.keys import Keys, event_id
from zoo_store.models import Manifest, VersionEvent, sha256_hex
from zoo_store.versions import VersionNotFound, VersionStore


class VerificationError(Exception):
    """The weights or manifest are not what the publisher wrote; the reason says which check failed."""


class Follower:
    def __init__(self, client: redis.Redis, line: str = "main", prefix: str = "filial",
                 signing_key: bytes | None = None, require_signature: bool | None = None) -> None:
        self.client = client
        self.line = line
        self.keys = Keys(prefix)
        self.store = VersionStore(client, self.keys)
        self.signing_key = signing_key
        self.require_signature = bool(signing_key) if require_signature is None else require_signature

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "Follower":
        return cls(connect(url), **kwargs)

    def latest_version(self) -> int | None:
        return self.store.latest(self.line)

    def events(self, from_version: int | Literal["latest", "next"] = 1, block_ms: int = 1000,
               stop: threading.Event | None = None) -> Iterator[VersionEvent]:
        """Yield events for versions ``>= from_version`` ("latest": the newest one first; "next":
        only versions published from now on), blocking for new ones until ``stop`` is set."""
        if from_version == "latest":
            newest = self.latest_version()
            last_id = event_id(newest - 1) if newest and newest > 1 else "0-0"
        elif from_version == "next":
            newest = self.latest_version() or 0
            last_id = event_id(newest) if newest else "0-0"
        else:
            last_id = event_id(from_version - 1) if from_version > 1 else "0-0"
        stream = self.keys.line(self.line).events
        while stop is None or not stop.is_set():
            reply = self.client.xread({stream: last_id}, block=block_ms, count=100)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    yield VersionEvent.model_validate_json(fields[b"event"])

    def verify(self, manifest: Manifest, weights: bytes) -> None:
        if sha256_hex(weights) != manifest.weights_sha256:
            raise VerificationError(f"{manifest.line} v{manifest.version}: weights sha256 does not "
                                    "match the manifest (tampered or corrupted)")
        if len(weights) != manifest.weights_bytes:
            raise VerificationError(f"{manifest.line} v{manifest.version}: weights are {len(weights)} "
                                    f"bytes, manifest says {manifest.weights_bytes}")
        if self.signing_key is not None and manifest.signature is not None:
            if not manifest.signature_valid(self.signing_key):
                raise VerificationError(f"{manifest.line} v{manifest.version}: manifest signature is "
                                        "invalid (tampered, or signed with another key)")
        elif self.require_signature:
            raise VerificationError(f"{manifest.line} v{manifest.version}: manifest is unsigned "
                                    "and a signature is required")

    def load(self, version: int) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Fetch, verify and decode a version's weights (never unpickles anything)."""
        manifest = self.store.manifest(self.line, version)
        weights = self.store.weights(self.line, version)
        self.verify(manifest, weights)
        return manifest, st_load(weights)


__all__ = ["Follower", "VerificationError", "VersionNotFound"]
