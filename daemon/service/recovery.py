"""Restart recovery: the last checkpoint into the engine and the ledger, then the versions this
line wrote after that checkpoint.

A crash between writing a version and checkpointing it leaves a version in Redis the checkpoint
does not name. Without adopting it, the restarted daemon would re-derive the state, publish it as
yet another version and leave the written one unserved (an orphan). Only direct successors are
adopted (parent = the served version, reason bootstrap, merge or rollback), after their weights verify.
The merge job calls :func:`adopt_unrecorded_versions` too: that is how a running daemon takes a
``filial rollback`` of its version (it then learns on from the rolled-back weights).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from safetensors.torch import load as st_load

from consumers.ledger import AppliedLedger
from daemon.engine.engine import Engine
from zoo_store.checkpoints import CheckpointStore
from zoo_store.connection import CappedBackoff
from zoo_store.models import sha256_hex
from zoo_store.versions import VersionNotFound, VersionStore

log = logging.getLogger("filial.service")


def load_checkpoint(store: CheckpointStore, stop: threading.Event, backoff_cap: float):
    """The latest checkpoint (meta, tensors) or None, waiting out a Redis outage with backoff."""
    backoff = CappedBackoff(base=0.5, cap=backoff_cap)
    while True:
        try:
            return store.load()
        except redis.RedisError as exc:
            wait = backoff.failed()
            log.warning("cannot read the checkpoint (%s); retrying in %.1fs", exc, wait)
            backoff.sleep(stop)
            if stop.is_set():
                raise


def ledger_from(meta: dict[str, Any]) -> AppliedLedger:
    return AppliedLedger.from_json(meta.get("ledger", {}))


def adopt_unrecorded_versions(engine: Engine, versions: VersionStore, line: str, me: str | None = None) -> int:
    """Serve the versions of ``line`` after the served one, in order; returns how many were adopted.
    Ours (``publisher`` is ``me``, or unnamed) were written before a crash: adopted as the merge
    they were. Another learner's (the merge leader's) or a rollback: adopted as external versions."""
    adopted = 0
    latest = versions.latest(line)
    while latest is not None and (engine.served_version or 0) < latest and engine.architecture is not None:
        served = engine.served_version
        candidates = range((served or 0) + 1, latest + 1)
        found = next(((m, w) for m, w in filter(None, (_verified(versions, line, v) for v in candidates))
                      if m.parent_version == served and m.reason in (("bootstrap",) if served is None
                                                                     else ("merge", "rollback"))),
                     None)
        if found is None and served is None:
            # a learner without a version of its own (new, or its checkpoint lost) joins the line where it
            # is: the latest version, even when the line's first one has expired
            found = _verified(versions, line, latest)
        if found is None:
            break
        manifest, weights = found
        external = manifest.reason == "rollback" or manifest.publisher not in (None, me)
        if served is None:   # the first version this engine serves: it starts from its weights
            adopted_ok = engine.adopt_recovered(version=manifest.version, parent_version=None,
                                                architecture=manifest.architecture, state=st_load(weights),
                                                base_version=manifest.base_version, metrics=manifest.metrics,
                                                plan=manifest.merge)
        elif external:
            adopted_ok = engine.adopt_external(version=manifest.version, parent_version=served,
                                               architecture=manifest.architecture, state=st_load(weights),
                                               base_version=manifest.base_version, metrics=manifest.metrics,
                                               carry_progress=manifest.reason != "rollback",
                                               merged_samples=_merged_contribution(manifest, me))
        else:
            adopted_ok = engine.adopt_recovered(version=manifest.version, parent_version=served,
                                                architecture=manifest.architecture, state=st_load(weights),
                                                base_version=manifest.base_version, metrics=manifest.metrics,
                                                plan=manifest.merge)
        if not adopted_ok:
            break
        adopted += 1
        if manifest.reason == "rollback":
            log.warning("v%d rolls v%s back to v%s: serving it and learning on from it", manifest.version, served,
                        manifest.rollback_of)
        elif external:
            log.info("v%d (%s by %s, the merge leader) adopted: learning on from it", manifest.version,
                     manifest.reason, manifest.publisher)
        else:
            log.warning("v%d (%s of v%s) was written before the last crash but not checkpointed: serving it "
                        "instead of re-deriving it", manifest.version, manifest.reason, served)
    return adopted


def _merged_contribution(manifest, me: str | None) -> int | None:
    """The sample count of this learner's contribution that the leader's merge took (its plan weighs
    each member by its samples), or None when it took none of this learner's."""
    weight = ((manifest.merge or {}).get("weights") or {}).get(f"learner:{me}") if me else None
    return int(weight) if weight is not None else None


def _verified(versions: VersionStore, line: str, version: int):
    try:
        manifest = versions.manifest(line, version)
        weights = versions.weights(line, version)
    except VersionNotFound:
        return None
    if sha256_hex(weights) != manifest.weights_sha256:
        log.error("v%d's weights do not match its manifest: not adopting it", version)
        return None
    return manifest, weights
