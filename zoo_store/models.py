"""Wire formats written to Redis: manifests and version events (JSON, pydantic-validated)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from datetime import datetime, timezone
from typing import Any, Literal

import rfc8785
from pydantic import BaseModel, Field, PrivateAttr

MANIFEST_SCHEMA = 1
# The manifest's signature scheme (README, "Signed manifests"): HMAC-SHA256 over the RFC 8785 (JCS)
# form of the stored manifest JSON without ``signature``. Manifests without ``signature_scheme`` were
# signed before it existed, over LEGACY_CANONICAL_JSON's bytes, and still verify.
SIGNATURE_SCHEME = "hmac-sha256-jcs"
SIGNATURE_SCHEMES = (SIGNATURE_SCHEME,)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical_json(data: Any) -> bytes:
    """RFC 8785 (JCS) bytes of ``data``: what any language's JCS library writes for the same JSON
    (numbers as ECMAScript writes them, ``1.0`` → ``1``; UTF-8, not \\u escapes). NaN and infinities
    have no JSON form: ValueError (a manifest stores them as null; see :meth:`Manifest.signing_payload`)."""
    _refuse_non_finite(data)
    return rfc8785.dumps(data)


def legacy_canonical_json(data: dict[str, Any]) -> bytes:
    """The form manifests without ``signature_scheme`` were signed over (Python's float formatting,
    ASCII escapes): kept only to verify them."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _refuse_non_finite(data: Any) -> None:
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"{data!r} has no JSON form (RFC 8785 refuses it)")
    if isinstance(data, dict):
        for value in data.values():
            _refuse_non_finite(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            _refuse_non_finite(value)


class LineageEntry(BaseModel):
    node_id: str
    parent: str | None
    slice: str
    created_at: str
    architecture: dict[str, Any]


class Manifest(BaseModel):
    """Everything a follower needs to verify, rebuild and judge a version."""

    schema_version: int = MANIFEST_SCHEMA
    line: str
    version: int = Field(ge=1)
    created_at: str
    reason: str = Field(description="bootstrap | merge | spawn | retrain | rollback")
    kind: Literal["served", "member"] = Field("served", description="the served line, or a zoo member (a child on "
                                              "its own line {line}.{child_id})")
    architecture: dict[str, Any] = Field(description="{family, params}: daemon.learn.models.Architecture")
    base_version: int | None = Field(None, description="version the task vectors were measured from")
    parent_version: int | None = Field(None, description="served version this one replaces")
    parent_line: str | None = Field(None, description="line of the parent (compact children)")
    lineage: list[LineageEntry] = Field(default_factory=list)
    metrics: dict[str, float | None] = Field(default_factory=dict, description="held-out accuracy per slice")
    merge: dict[str, Any] | None = Field(None, description="plan chosen and candidates' scores")
    continual: dict[str, Any] | None = Field(None, description="continual-learning metrics of this version: "
                                             "average_accuracy, forgetting per slice, average_forgetting, bwt, "
                                             "learned (slices this version is the first to learn); README")
    slices: list[str] = Field(default_factory=list, description="slices this model was trained on")
    spawn_method: str | None = Field(None, description="members: how the child inherited (copy | hkt | scratch)")
    rollback_of: int | None = Field(None, description="rollbacks: the version whose weights this one republishes")
    publisher: str | None = Field(None, description="the learner that published it (the merge leader's lease holder)")
    fencing_token: int | None = Field(None, description="the merge lease's fencing token it was published under "
                                      "(zoo_store.lease): never smaller than an earlier version's on the line")
    weights_sha256: str
    weights_bytes: int
    fingerprint_slices: list[str] = Field(default_factory=list, description="slices of the fingerprint file, in "
                                          "order (daemon.learn.fingerprint.decode_fingerprints)")
    fingerprint_sha256: str | None = None
    fingerprint_bytes: int | None = None
    publish_id: str
    signature_scheme: str | None = Field(None, description=f"{SIGNATURE_SCHEME!r} for signed manifests; absent "
                                         "on those signed before it existed (legacy canonical JSON)")
    signature: str | None = Field(None, description="hex HMAC-SHA256 of the manifest without this field")

    # The JSON object this manifest was read from (:meth:`from_stored`): the signature covers what was
    # stored, so a manifest written before a field was added still verifies after the upgrade.
    _stored: dict[str, Any] | None = PrivateAttr(None)

    @classmethod
    def from_stored(cls, raw: bytes | str) -> "Manifest":
        manifest = cls.model_validate_json(raw)
        manifest._stored = json.loads(raw)
        return manifest

    def signing_payload(self) -> bytes:
        """The bytes the HMAC covers. With ``signature_scheme``: the JCS form of the manifest exactly
        as stored (its JSON, NaN and infinities written as null, as pydantic stores them) without
        ``signature``, so a follower in any language signs what it reads. Without it: the legacy form."""
        stored = self._stored if self._stored is not None else json.loads(self.model_dump_json())
        if self.signature_scheme is None:
            return legacy_canonical_json({k: v for k, v in stored.items() if k not in ("signature", "signature_scheme")})
        if self.signature_scheme not in SIGNATURE_SCHEMES:
            raise ValueError(f"unknown signature_scheme {self.signature_scheme!r} (known: {', '.join(SIGNATURE_SCHEMES)})")
        return canonical_json({k: v for k, v in stored.items() if k != "signature"})

    def sign(self, key: bytes) -> "Manifest":
        scheme = self.model_copy(update={"signature_scheme": SIGNATURE_SCHEME})
        return scheme.model_copy(update={"signature": hmac.new(key, scheme.signing_payload(),
                                                                hashlib.sha256).hexdigest()})

    def signature_valid(self, key: bytes) -> bool:
        if not self.signature:
            return False
        try:
            payload = self.signing_payload()
        except ValueError:  # an unknown scheme (a newer writer) or a legacy manifest holding NaN
            return False
        expected = hmac.new(key, payload, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.signature)


class VersionEvent(BaseModel):
    """One entry of ``{p}:line:{line}:events``: announces a version whose data is already written."""

    type: Literal["version.published"] = "version.published"
    line: str
    version: int
    created_at: str
    reason: str
    base_version: int | None = None
    parent_version: int | None = None
    weights_key: str
    manifest_key: str
    weights_sha256: str
    metrics: dict[str, float | None] = Field(default_factory=dict)


class ZooEvent(BaseModel):
    """One entry of ``{p}:zoo:events``: a member's new version (its data already written) or its removal."""

    type: Literal["member.published", "member.removed"]
    line: str
    version: int | None = None
    created_at: str
    reason: str = ""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
