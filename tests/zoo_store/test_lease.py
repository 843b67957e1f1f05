"""The merge leader's lease and fencing against a real Redis-protocol server."""

from __future__ import annotations

import threading
import time

import pytest

from zoo_store.connection import connect
from zoo_store.keys import Keys
from zoo_store.lease import Fenced, Lease
from zoo_store.versions import VersionStore

ARCH = {"family": "tabular_mlp", "params": {"in_features": 4, "num_classes": 3, "width": 2}}


def test_one_holder_at_a_time_and_tokens_only_grow(redis_client, unique):
    keys = Keys(unique)
    a, b = Lease(redis_client, keys, "a", ttl_seconds=0.3), Lease(redis_client, keys, "b", ttl_seconds=0.3)
    first = a.acquire()
    assert first == 1 and b.acquire() is None and a.acquire() == first   # renewing keeps the token
    assert a.current().holder == "a"
    time.sleep(0.45)   # a paused past its time to live
    second = b.acquire()
    assert second == 2 and a.acquire() is None
    b.release()
    assert a.acquire() == 3


def test_contenders_never_share_a_token(redis_server, unique):
    keys, won, lock = Keys(unique), [], threading.Lock()

    def contend(name: str) -> None:
        token = Lease(connect(redis_server.address), keys, name, ttl_seconds=30).acquire()
        if token is not None:
            with lock:
                won.append((name, token))

    threads = [threading.Thread(target=contend, args=(f"p{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0][1] == 1


def test_a_former_leader_cannot_publish(redis_client, unique):
    keys = Keys(unique)
    store = VersionStore(redis_client, keys)
    old, new = Lease(redis_client, keys, "old", ttl_seconds=0.2), Lease(redis_client, keys, "new", ttl_seconds=30)
    stale = old.acquire()
    store.publish("main", b"w1", publish_id="1", reason="merge", architecture=ARCH, fencing_token=stale)
    time.sleep(0.3)
    fresh = new.acquire()
    with pytest.raises(Fenced, match="stale"):
        store.publish("main", b"w2", publish_id="2", reason="merge", architecture=ARCH, fencing_token=stale)
    assert store.latest("main") == 1   # nothing of the fenced publish was written
    assert store.publish("main", b"w2", publish_id="2", reason="merge", architecture=ARCH,
                         fencing_token=fresh).manifest.version == 2
    # each manifest says under which token it was published: an audit sees them increase
    assert [store.manifest("main", v).fencing_token for v in (1, 2)] == [stale, fresh] and fresh > stale
