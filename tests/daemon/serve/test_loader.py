"""The loader against a real Redis-protocol server: versions and members published as the daemon
publishes them, verified loads, atomic swaps, refusals, pinning, removals and an outage."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save as st_save

from daemon.learn.fingerprint import Fingerprint, encode_fingerprints
from daemon.learn.models import Architecture
from daemon.serve.loader import ZooLoader
from daemon.serve.predictor import NotReady, Predictor
from tests.helpers import wait_until
from zoo_store.connection import connect
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore
from zoo_store.zoo import ZooStore

ARCH = Architecture(family="tabular_mlp", params={"in_features": 4, "num_classes": 3, "width": 4})
KEY = b"k" * 32
TIMEOUT = 20.0


def publish(store: VersionStore, line: str, seed: int, kind: str = "served", slices=("a",), reason="merge") -> int:
    """One version as the daemon writes it: weights, manifest (kind, slices, metrics) and fingerprint."""
    torch.manual_seed(seed)
    model = ARCH.build().eval()
    rows = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fingerprint = {s: Fingerprint.fit(model.features(rows)) for s in slices}
    published = store.publish(line, st_save(model.state_dict()), publish_id=f"{line}:{seed}", reason=reason,
                              architecture=ARCH.model_dump(), kind=kind, slices=list(slices),
                              metrics={s: 0.5 + seed / 100 for s in slices},
                              fingerprint=st_save(encode_fingerprints(fingerprint)), fingerprint_slices=list(slices))
    return published.manifest.version


def served_version(loader: ZooLoader, version: int) -> bool:
    return loader.wait_for(lambda s: s is not None and s.served.version == version, TIMEOUT)


def member_names(loader: ZooLoader) -> list[str]:
    snap = loader.snapshot()
    return [m.name for m in snap.members] if snap else []


@pytest.fixture
def stores(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique), signing_key=KEY)
    return store, ZooStore(store)


def loader_for(redis_client, unique, **kwargs) -> ZooLoader:
    return ZooLoader(redis_client, prefix=unique, signing_key=KEY, block_ms=50, **kwargs)


def test_loads_the_served_version_and_members_then_swaps_to_the_next(redis_client, unique, stores):
    store, zoo = stores
    publish(store, "main", 1, slices=("a", "b"))
    zoo.enter("main.c1", publish(store, "main.c1", 2, kind="member"))
    swaps = []
    loader = loader_for(redis_client, unique, on_swap=lambda v, at: swaps.append((v, at, time.time())))
    predictor = Predictor(loader, mode="blend")
    with pytest.raises(NotReady):
        predictor.predict(torch.rand(2, 4))
    with loader:
        assert served_version(loader, 1)
        assert loader.wait_for(lambda s: len(s.members) == 1, TIMEOUT)
        snap = loader.snapshot()
        assert member_names(loader) == ["main.c1:v1"] and snap.members[0].kind == "member"
        assert set(snap.served.fingerprints) == {"a", "b"} and snap.served.metrics == {"a": 0.51, "b": 0.51}
        first = predictor.predict(torch.rand(5, 4))
        assert first.version == 1 and first.members == ("main:v1", "main.c1:v1") and first.weights.shape == (5, 2)

        publish(store, "main", 3)
        assert served_version(loader, 2)
        assert snap.served.version == 1               # a snapshot taken before the swap is unchanged
        assert predictor.predict(torch.rand(5, 4)).version == 2
        assert [v for v, _, _ in swaps] == [1, 2]
        assert all(0 <= seen - at < 5 for _, at, seen in swaps)   # published_at: the manifest's created_at
        stats = loader.stats()
        assert stats.ready and stats.version == 2 and stats.zoo_size == 2 and stats.refusals == 0
        assert stats.swaps >= 2 and stats.last_swap_at is not None


def test_a_tampered_member_is_refused_and_the_previous_one_keeps_serving(redis_client, unique, stores):
    store, zoo = stores
    publish(store, "main", 1)
    zoo.enter("main.c1", publish(store, "main.c1", 2, kind="member"))
    with loader_for(redis_client, unique) as loader:
        assert loader.wait_for(lambda s: s is not None and len(s.members) == 1, TIMEOUT)
        version = publish(store, "main.c1", 3, kind="member")
        weights_key = Keys(unique).line("main.c1").weights(version)
        redis_client.set(weights_key, store.weights("main.c1", 1))    # weights changed after publish
        zoo.enter("main.c1", version)
        assert wait_until(lambda: loader.stats().refusals == 1, TIMEOUT)
        assert member_names(loader) == ["main.c1:v1"]
        # a served version signed with another key is refused too; v1 keeps serving
        VersionStore(redis_client, Keys(unique), signing_key=b"x" * 32).publish(
            "main", store.weights("main", 1), publish_id="forged", reason="merge", architecture=ARCH.model_dump())
        assert wait_until(lambda: loader.stats().refusals == 2, TIMEOUT)
        assert loader.snapshot().served.version == 1
        publish(store, "main", 4)                                     # the next good one is taken
        assert served_version(loader, 3)


def test_pin_version_serves_that_version_and_ignores_newer_ones(redis_client, unique, stores):
    store, _ = stores
    publish(store, "main", 1)
    publish(store, "main", 2)
    with loader_for(redis_client, unique, pin_version=1) as pinned, loader_for(redis_client, unique) as latest:
        assert served_version(pinned, 1) and served_version(latest, 2)
        publish(store, "main", 3)
        assert served_version(latest, 3)
        time.sleep(0.3)
        assert pinned.snapshot().served.version == 1 and pinned.stats().version == 1


def test_pinning_a_version_not_yet_published_waits_for_it(redis_client, unique, stores):
    store, _ = stores
    with loader_for(redis_client, unique, pin_version=2) as loader:
        publish(store, "main", 1)
        time.sleep(0.3)
        assert not loader.ready and loader.snapshot() is None
        publish(store, "main", 2)
        assert served_version(loader, 2)
        publish(store, "main", 3)
        time.sleep(0.3)
        assert loader.stats().version == 2


def test_member_removed_drops_it(redis_client, unique, stores):
    store, zoo = stores
    publish(store, "main", 1)
    for i in (1, 2):
        zoo.enter(f"main.c{i}", publish(store, f"main.c{i}", 10 + i, kind="member"))
    zoo.enter("other.c1", publish(store, "other.c1", 20, kind="member"))    # another line's child: not ours
    with loader_for(redis_client, unique) as loader:
        assert loader.wait_for(lambda s: s is not None and len(s.members) == 2, TIMEOUT)
        assert member_names(loader) == ["main.c1:v1", "main.c2:v1"]
        zoo.remove("main.c1", "retired")
        assert loader.wait_for(lambda s: [m.line for m in s.members] == ["main.c2"], TIMEOUT)
        assert loader.stats().zoo_size == 2


def test_the_loader_rides_out_a_redis_outage(restartable_redis, unique):
    client = connect(restartable_redis.address)
    store = VersionStore(client, Keys(unique), signing_key=KEY)
    zoo = ZooStore(store)
    publish(store, "main", 1)
    with loader_for(client, unique) as loader:
        assert served_version(loader, 1)
        restartable_redis.stop()
        time.sleep(0.5)
        restartable_redis.start()
        assert wait_until(lambda: _ping(client), TIMEOUT)
        publish(store, "main", 2)
        zoo.enter("main.c1", publish(store, "main.c1", 3, kind="member"))
        assert served_version(loader, 2)
        assert loader.wait_for(lambda s: len(s.members) == 1, TIMEOUT)
    client.close()


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
