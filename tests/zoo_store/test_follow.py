"""Followers refuse what the publisher did not write, and say why (docs/architecture.md, invariant 4)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import save as st_save

from zoo_store.follow import Follower, VerificationError
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore

KEY = b"s3cret-hmac-key"


def _publish(client, prefix: str, key: bytes | None, publish_id: str = "p1") -> tuple[int, bytes]:
    weights = st_save({"w": torch.arange(12.0).view(3, 4), "b": torch.zeros(3)})
    store = VersionStore(client, Keys(prefix), signing_key=key)
    published = store.publish("main", weights, publish_id=publish_id, reason="bootstrap",
                              architecture={"family": "tabular_mlp", "params": {}}, metrics={"a": 0.9})
    return published.manifest.version, weights


def test_signed_version_loads(redis_client, unique):
    version, _ = _publish(redis_client, unique, KEY)
    manifest, state = Follower(redis_client, prefix=unique, signing_key=KEY).load(version)
    assert manifest.signature and torch.equal(state["w"], torch.arange(12.0).view(3, 4))


@pytest.mark.parametrize("tamper, reason", [
    ("flip_weight_byte", "sha256 does not match"),
    ("truncate_weights", "bytes, manifest says"),
    ("edit_metrics", "signature is invalid"),
    ("swap_weights_and_digest", "signature is invalid"),
    ("strip_signature", "unsigned"),
    ("garbage_manifest", "not a valid manifest"),
    ("manifest_of_another_version", "the manifest stored there is for"),
])
def test_tampered_weights_or_manifest_refused_with_reason(redis_client, unique, tamper, reason):
    version, weights = _publish(redis_client, unique, KEY)
    lk = Keys(unique).line("main")
    manifest = json.loads(redis_client.get(lk.manifest(version)))
    if tamper == "flip_weight_byte":
        redis_client.set(lk.weights(version), weights[:-1] + bytes([weights[-1] ^ 1]))
    elif tamper == "truncate_weights":
        redis_client.set(lk.weights(version), weights[:-8])
    elif tamper == "edit_metrics":
        manifest["metrics"]["a"] = 0.99
    elif tamper == "swap_weights_and_digest":  # an attacker who rewrites weights and the digest, not the HMAC
        import hashlib

        forged = st_save({"w": torch.ones(3, 4), "b": torch.zeros(3)})
        redis_client.set(lk.weights(version), forged)
        manifest.update(weights_sha256=hashlib.sha256(forged).hexdigest(), weights_bytes=len(forged))
    elif tamper == "strip_signature":
        manifest["signature"] = None
    elif tamper == "garbage_manifest":
        manifest = None
        redis_client.set(lk.manifest(version), b"{not json")
    elif tamper == "manifest_of_another_version":
        manifest["version"] = version + 1
    if manifest is not None:
        redis_client.set(lk.manifest(version), json.dumps(manifest))
    with pytest.raises(VerificationError, match=reason):
        Follower(redis_client, prefix=unique, signing_key=KEY).load(version)


def test_unsigned_refused_when_a_key_is_configured(redis_client, unique):
    version, _ = _publish(redis_client, unique, key=None)
    with pytest.raises(VerificationError, match="unsigned"):
        Follower(redis_client, prefix=unique, signing_key=KEY).load(version)
    with pytest.raises(VerificationError, match="signature is invalid"):
        _publish(redis_client, unique, key=b"another key", publish_id="p2")
        Follower(redis_client, prefix=unique, signing_key=KEY).load(version + 1)
    # without a key a follower still checks the digest and loads
    Follower(redis_client, prefix=unique).load(version)


def test_follower_rides_out_a_redis_outage(restartable_redis, unique):
    from zoo_store.connection import connect

    client = connect(restartable_redis.address)
    follower = Follower(connect(restartable_redis.address), prefix=unique)
    seen, stop = [], threading.Event()

    def follow():
        for event in follower.events(from_version=1, block_ms=100, stop=stop):
            seen.append(event.version)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    _publish(client, unique, None, "p1")
    restartable_redis.stop()
    restartable_redis.start()
    _publish(client, unique, None, "p2")
    deadline = threading.Event()
    for _ in range(100):
        if seen == [1, 2]:
            break
        deadline.wait(0.1)
    stop.set()
    thread.join(timeout=5)
    assert seen == [1, 2]


def test_the_readme_snippet_runs_a_loaded_version(redis_client, unique):
    """README, "Following in any language": rebuild the manifest's architecture, preprocess as the daemon does."""
    from daemon.learn.models import Architecture
    from daemon.learn.training import model_input

    arch = {"family": "image_cnn", "params": {"in_channels": 1, "num_classes": 10, "width": 4}}
    torch.manual_seed(0)
    trained = Architecture.model_validate(arch).build().eval()
    VersionStore(redis_client, Keys(unique)).publish("main", st_save(trained.state_dict()), publish_id="p",
                                                     reason="bootstrap", architecture=arch)
    manifest, state_dict = Follower(redis_client, prefix=unique).load(1)
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)  # as a producer sends images

    model = Architecture.model_validate(manifest.architecture).build()
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        classes = model(model_input(x, "image")).argmax(1)
        expected = trained(x.float().div(255).unsqueeze(1)).argmax(1)
    assert torch.equal(classes, expected)
