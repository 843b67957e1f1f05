"""Manifest signatures: RFC 8785 (JCS) bytes any language reproduces, legacy manifests still verify,
NaN/inf signed as the null they are stored as (README, "Signed manifests")."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import torch
from safetensors.torch import save as st_save

from zoo_store.follow import Follower, VerificationError
from zoo_store.keys import Keys
from zoo_store.models import SIGNATURE_SCHEME, Manifest, canonical_json, legacy_canonical_json
from zoo_store.versions import VersionStore

KEY = b"s3cret-hmac-key"


def _manifest(**extra) -> Manifest:
    fields = dict(line="main", version=3, created_at="2026-01-01T00:00:00.000+00:00", reason="merge",
                  architecture={"family": "tabular_mlp", "params": {"width": 64}}, base_version=1,
                  parent_version=2, metrics={"a": 1.0, "b": 0.8125}, merge={"lam": 1.0, "rows": 1280.0},
                  weights_sha256="ab" * 32, weights_bytes=10, publish_id="merge:2:x")
    fields.update(extra)
    return Manifest(**fields)


def test_canonical_json_is_rfc8785_numbers_and_utf8_not_pythons_formatting():
    # Python's json writes 1.0, 1280.0 and \u00e9; JCS (and so JavaScript) writes 1, 1280 and é
    assert canonical_json({"b": 1.0, "a": [1280.0, 0.1, 1e21, None, True, "é"]}) == \
        '{"a":[1280,0.1,1e+21,null,true,"é"],"b":1}'.encode()
    assert legacy_canonical_json({"b": 1.0}) == b'{"b":1.0}'
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="no JSON form"):
            canonical_json({"metrics": {"a": [bad]}})


def test_signature_is_hmac_of_the_jcs_form_of_the_stored_json_without_signature():
    signed = _manifest().sign(KEY)
    assert signed.signature_scheme == SIGNATURE_SCHEME
    stored = json.loads(signed.model_dump_json())  # what a follower in any language reads
    del stored["signature"]
    payload = canonical_json(stored)
    assert b'"lam":1,' in payload and b'"rows":1280}' in payload and b'"signature_scheme":"hmac-sha256-jcs"' in payload
    assert signed.signature == hmac.new(KEY, payload, hashlib.sha256).hexdigest()
    assert Manifest.model_validate_json(signed.model_dump_json()).signature_valid(KEY)


def test_a_manifest_signed_before_the_scheme_existed_still_verifies_and_the_scheme_cannot_be_stripped():
    old = _manifest()
    legacy_payload = legacy_canonical_json(old.model_dump(mode="json", exclude={"signature", "signature_scheme"}))
    assert b'"lam":1.0' in legacy_payload  # the bytes the old daemon signed
    stored = old.model_dump(mode="json", exclude={"signature_scheme"})
    stored["signature"] = hmac.new(KEY, legacy_payload, hashlib.sha256).hexdigest()
    assert Manifest.model_validate_json(json.dumps(stored)).signature_valid(KEY)

    downgraded = json.loads(_manifest().sign(KEY).model_dump_json())
    del downgraded["signature_scheme"]
    assert not Manifest.model_validate(downgraded).signature_valid(KEY)
    assert not Manifest.model_validate(stored).signature_valid(b"other")


def test_nan_and_inf_metrics_are_stored_and_signed_as_null():
    signed = _manifest(metrics={"a": float("nan"), "b": float("inf")}, merge={"score": -float("inf")}).sign(KEY)
    stored = json.loads(signed.model_dump_json())
    assert stored["metrics"] == {"a": None, "b": None} and stored["merge"] == {"score": None}
    del stored["signature"]
    assert signed.signature == hmac.new(KEY, canonical_json(stored), hashlib.sha256).hexdigest()
    assert Manifest.model_validate_json(signed.model_dump_json()).signature_valid(KEY)


def test_follower_names_a_signature_scheme_it_does_not_know(redis_client, unique):
    weights = st_save({"w": torch.zeros(2)})
    store = VersionStore(redis_client, Keys(unique), signing_key=KEY)
    version = store.publish("main", weights, publish_id="p", reason="bootstrap",
                            architecture={"family": "tabular_mlp", "params": {}}).manifest.version
    key = Keys(unique).line("main").manifest(version)
    manifest = json.loads(redis_client.get(key))
    manifest["signature_scheme"] = "hmac-sha512-future"
    redis_client.set(key, json.dumps(manifest))
    with pytest.raises(VerificationError, match="scheme 'hmac-sha512-future'.*upgrade the follower"):
        Follower(redis_client, prefix=unique, signing_key=KEY).load(version)
