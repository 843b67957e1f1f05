"""The zoo against a real Redis-protocol server: members with fingerprints, events, retention."""

from __future__ import annotations

import hashlib
import hmac
import json
from itertools import islice

import pytest
import torch
from safetensors.torch import save as st_save

from daemon.learn.fingerprint import Fingerprint, decode_fingerprints, encode_fingerprints
from daemon.learn.models import Architecture
from zoo_store.follow import Follower, VerificationError
from zoo_store.keys import Keys
from zoo_store.models import SIGNATURE_SCHEME, Manifest, canonical_json
from zoo_store.versions import VersionStore
from zoo_store.zoo import ZooFollower, ZooStore

ARCH = {"family": "tabular_mlp", "params": {"in_features": 4, "num_classes": 3, "width": 2}}
KEY = b"k" * 32


def _weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return st_save(Architecture.model_validate(ARCH).build().state_dict())


def _fingerprint(seed: int) -> bytes:
    rows = torch.randn(64, 6, generator=torch.Generator().manual_seed(seed))
    return st_save(encode_fingerprints({"a.b": Fingerprint.fit(rows)}))


def _member(store: VersionStore, zoo: ZooStore, line: str, seed: int) -> list[str]:
    published = store.publish(line, _weights(seed), publish_id=f"{line}:{seed}", reason="retrain", architecture=ARCH,
                              kind="member", slices=["a.b"], metrics={"a.b": 0.9}, parent_line="main",
                              fingerprint=_fingerprint(seed), fingerprint_slices=["a.b"])
    return zoo.enter(line, published.manifest.version)


def test_a_member_loads_verified_with_its_fingerprint_and_is_announced(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique), signing_key=KEY)
    zoo, follower = ZooStore(store), ZooFollower(redis_client, prefix=unique, signing_key=KEY)
    start = follower.last_event_id()
    _member(store, zoo, "main.c1", 1)
    assert follower.members() == {"main.c1": 1}
    event = next(follower.events(from_id=start, block_ms=100))
    assert (event.type, event.line, event.version) == ("member.published", "main.c1", 1)
    loaded = follower.load("main.c1", 1)
    assert loaded.manifest.kind == "member" and loaded.manifest.slices == ["a.b"]
    fingerprints = decode_fingerprints(loaded.fingerprint, loaded.manifest.fingerprint_slices)
    assert fingerprints["a.b"].dims == 6


def test_a_tampered_fingerprint_is_refused(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique), signing_key=KEY)
    _member(store, ZooStore(store), "main.c1", 1)
    redis_client.set(Keys(unique).line("main.c1").fingerprint(1), _fingerprint(2))
    with pytest.raises(VerificationError, match="fingerprint does not match"):
        ZooFollower(redis_client, prefix=unique, signing_key=KEY).load("main.c1", 1)


def test_retention_keeps_the_zoo_within_its_count_and_bytes(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique))
    zoo = ZooStore(store, max_members=2)
    follower = ZooFollower(redis_client, prefix=unique)
    start = follower.last_event_id()
    for i in range(1, 4):
        removed = _member(store, zoo, f"main.c{i}", i)
    assert removed == ["main.c1"] and set(zoo.members()) == {"main.c2", "main.c3"}
    assert store.versions("main.c1") == [] and "main.c1" not in store.lines()
    assert not redis_client.keys(f"{unique}:line:main.c1:*")
    kinds = [(e.type, e.line) for e in islice(follower.events(from_id=start, block_ms=100), 4)]
    assert kinds[-1] == ("member.removed", "main.c1")
    one_member = store.stored_bytes("main.c3")
    zoo.max_members, zoo.max_bytes = 10, one_member + 10  # room for one member: the newest stays
    assert _member(store, zoo, "main.c4", 4) == ["main.c2", "main.c3"]
    assert zoo.members() == {"main.c4": 1}


def test_a_manifest_signed_before_new_fields_existed_still_verifies(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique), signing_key=KEY)
    store.publish("main", _weights(0), publish_id="a", reason="bootstrap", architecture=ARCH)
    key = Keys(unique).line("main").manifest(1)
    old = json.loads(redis_client.get(key))
    for field in ("kind", "slices", "spawn_method", "rollback_of", "fingerprint_slices", "fingerprint_sha256",
                  "fingerprint_bytes", "signature", "signature_scheme"):
        old.pop(field)
    old["signature_scheme"] = SIGNATURE_SCHEME
    old["signature"] = hmac.new(KEY, canonical_json(old), hashlib.sha256).hexdigest()
    redis_client.set(key, json.dumps(old))  # as a writer before these fields signed it
    assert Manifest.from_stored(json.dumps(old)).kind == "served"
    manifest, _ = Follower(redis_client, prefix=unique, signing_key=KEY).load(1)
    assert manifest.kind == "served"
