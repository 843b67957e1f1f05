"""Wire formats written to Redis: manifests and version events (JSON, pydantic-validated)."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

MANIFEST_SCHEMA = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


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
    weights_sha256: str
    weights_bytes: int
    publish_id: str
    signature: str | None = Field(None, description="hex HMAC-SHA256 of the manifest without this field")

    def signing_payload(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    def sign(self, key: bytes) -> "Manifest":
        return self.model_copy(update={"signature": hmac.new(key, self.signing_payload(), hashlib.sha256).hexdigest()})

    def signature_valid(self, key: bytes) -> bool:
        if not self.signature:
            return False
        expected = hmac.new(key, self.signing_payload(), hashlib.sha256).hexdigest()
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
