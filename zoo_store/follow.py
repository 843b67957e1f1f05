"""The downstream SDK: follow a model line's versions and load verified weights.

    from zoo_store.follow import Follower
    follower = Follower.from_url("redis://localhost:6379/0", line="main", signing_key=b"...")
    for event in follower.events(from_version="latest"):
        manifest, state_dict = follower.load(event.version)   # sha256 + signature checked

Followers in other languages do the same from the key layout in ``zoo_store/keys.py``:
XREAD the events stream from ``{n}-0``, GET manifest and weights, check the sha256 (and the
HMAC when a key is configured) before loading the safetensors bytes.

What a follower refuses, and says why (:class:`VerificationError`): weights whose sha256 or size
differ from the manifest; a manifest that is not valid JSON, or names another line/version than
the key it was read from; with a signing key: an unsigned manifest, or one whose HMAC does not
match (tampered, or signed with another key); weights that are not a safetensors file.
:meth:`Follower.events` rides out Redis outages: it reconnects with capped backoff and resumes
after the last event it yielded, so no version is skipped or repeated.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterator, Literal

import redis
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from zoo_store.connection import CappedBackoff, connect
from zoo_store.keys import Keys, event_id
from zoo_store.models import SIGNATURE_SCHEMES, Manifest, VersionEvent, sha256_hex
from zoo_store.tensors import decode
from zoo_store.versions import VersionNotFound, VersionStore


log = logging.getLogger("filial.follow")


@dataclass(frozen=True)
class LoadedVersion:
    """A verified version: its manifest, weights and (when published with one) fingerprint tensors
    (``daemon.learn.fingerprint.decode_fingerprints(fingerprint, manifest.fingerprint_slices)``)."""
    manifest: Manifest
    state: dict[str, torch.Tensor]
    fingerprint: dict[str, torch.Tensor] | None


class VerificationError(Exception):
    """The weights or manifest are not what the publisher wrote; the reason says which check failed."""


def read_stream(client: redis.Redis, stream: str, last_id: str, block_ms: int,
                stop: threading.Event | None) -> Iterator[dict[bytes, bytes]]:
    """Each entry's fields after ``last_id``, blocking for new ones until ``stop`` is set; a Redis
    outage is waited out with capped backoff and reading resumes after the last entry yielded, so
    nothing is skipped or repeated."""
    backoff = CappedBackoff(base=0.2, cap=10.0)
    while stop is None or not stop.is_set():
        try:
            reply = client.xread({stream: last_id}, block=block_ms, count=100)
        except redis.ConnectionError as exc:
            log.warning("cannot read %s (%s); retrying in %.1fs", stream, exc, backoff.failed())
            backoff.sleep(stop)
            continue
        backoff.succeeded()
        for _, entries in reply or ():
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                yield fields


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
            first = self.latest_version() or 1
        elif from_version == "next":
            first = (self.latest_version() or 0) + 1
        else:
            first = from_version
        last_id = event_id(max(first - 1, 0))  # XREAD returns entries after last_id; "0-0" = all
        for fields in read_stream(self.client, self.keys.line(self.line).events, last_id, block_ms, stop):
            yield VersionEvent.model_validate_json(fields[b"event"])
            self.store.ready_next_buffer()   # the caller is done with that event: wait with a buffer ready

    def verify(self, manifest: Manifest, weights: bytes) -> None:
        """Raise :class:`VerificationError` unless ``weights`` are exactly what ``manifest`` describes
        and, with a signing key, the manifest carries a valid HMAC."""
        self._verify_weights(manifest, len(weights), sha256_hex(weights))

    def _verify_size(self, manifest: Manifest, size: int) -> None:
        if size != manifest.weights_bytes:
            raise VerificationError(f"{manifest.line} v{manifest.version}: weights are {size} bytes, manifest says "
                                    f"{manifest.weights_bytes} (tampered or truncated)")

    def _verify_weights(self, manifest: Manifest, size: int, digest: str) -> None:
        """The checks of :meth:`verify`, given the weights' size and sha256 (hex)."""
        what = f"{manifest.line} v{manifest.version}"
        self._verify_size(manifest, size)
        if digest != manifest.weights_sha256:
            raise VerificationError(f"{what}: weights sha256 does not match the manifest (tampered or corrupted)")
        if self.signing_key is not None:
            if manifest.signature is None:
                raise VerificationError(f"{what}: manifest is unsigned and this follower requires a signature "
                                        "(a signing key is configured)")
            if manifest.signature_scheme not in (None, *SIGNATURE_SCHEMES):
                raise VerificationError(f"{what}: manifest is signed with scheme {manifest.signature_scheme!r}, "
                                        f"which this follower does not know (known: {', '.join(SIGNATURE_SCHEMES)}); "
                                        "upgrade the follower")
            if not manifest.signature_valid(self.signing_key):
                raise VerificationError(f"{what}: manifest signature is invalid (tampered, or signed with "
                                        "another key)")
        elif self.require_signature:
            if manifest.signature is None:
                raise VerificationError(f"{what}: manifest is unsigned and a signature is required")
            raise VerificationError(f"{what}: a signature is required but this follower has no signing key "
                                    "to check it with")

    def manifest(self, version: int) -> Manifest:
        try:
            manifest = self.store.manifest(self.line, version)
        except ValidationError as exc:
            raise VerificationError(f"{self.line} v{version}: manifest is not a valid manifest "
                                    f"({exc.error_count()} errors, first: {exc.errors()[0]['msg']})") from None
        if manifest.line != self.line or manifest.version != version:
            raise VerificationError(f"{self.line} v{version}: the manifest stored there is for "
                                    f"{manifest.line} v{manifest.version} (moved or replayed)")
        return manifest

    def load_version(self, version: int) -> "LoadedVersion":
        """:meth:`load`, and the version's fingerprint file verified against the manifest's sha256
        (None when it was published without one)."""
        manifest, state = self.load(version)
        if manifest.fingerprint_sha256 is None:
            return LoadedVersion(manifest, state, None)
        what = f"{self.line} v{version}"
        raw = self.store.fingerprint(self.line, version)
        if len(raw) != manifest.fingerprint_bytes or sha256_hex(raw) != manifest.fingerprint_sha256:
            raise VerificationError(f"{what}: fingerprint does not match the manifest (tampered or corrupted)")
        try:
            return LoadedVersion(manifest, state, st_load(raw))
        except SafetensorError as exc:
            raise VerificationError(f"{what}: fingerprint is not a safetensors file ({exc})") from None

    def load(self, version: int) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Fetch, verify and decode a version's weights (safetensors only; nothing is deserialised
        into objects). The weights are read in chunks into one buffer, hashed as they arrive, and the
        tensors are views of that buffer (:func:`zoo_store.tensors.decode`): one fresh allocation of
        the weights' size instead of three (the reply parser's buffer, the reply, each tensor's copy).
        A stored size other than the manifest's is refused before anything is read."""
        manifest = self.manifest(version)
        size = self.store.weights_size(self.line, version)
        self._verify_size(manifest, size)
        weights, digest = self.store.read_weights(self.line, version, size)
        self._verify_weights(manifest, size, digest)
        try:
            return manifest, decode(weights)
        except SafetensorError as exc:
            raise VerificationError(f"{self.line} v{version}: weights are not a safetensors file ({exc})") from None


__all__ = ["Follower", "LoadedVersion", "VerificationError", "VersionNotFound"]
