"""Publishing against a real Redis-protocol server: atomic, monotonic, gap-free, idempotent."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save as st_save

from zoo_store.follow import Follower, VerificationError
from zoo_store.keys import Keys
from zoo_store.versions import VersionNotFound, VersionStore

ARCH = {"family": "tabular_mlp", "params": {"in_features": 4, "num_classes": 3, "width": 2}}


def _weights(seed: int) -> bytes:
    from daemon.learn.models import Architecture

    torch.manual_seed(seed)
    return st_save(Architecture.model_validate(ARCH).build().state_dict())


def test_versions_are_numbered_from_one_and_data_precedes_event(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique))
    first = store.publish("main", _weights(0), publish_id="a", reason="bootstrap", architecture=ARCH)
    second = store.publish("main", _weights(1), publish_id="b", reason="merge", architecture=ARCH,
                           base_version=1, parent_version=1, metrics={"s": 0.9})
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert store.latest("main") == 2 and store.versions("main") == [1, 2]
    assert store.manifest("main", 2).metrics == {"s": 0.9}
    assert store.weights("main", 2) == _weights(1)


def test_a_retried_publish_is_not_announced_twice(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique))
    one = store.publish("main", _weights(0), publish_id="same", reason="merge", architecture=ARCH)
    again = store.publish("main", _weights(0), publish_id="same", reason="merge", architecture=ARCH)
    assert one.created and not again.created
    assert again.manifest.version == 1 and store.versions("main") == [1]


def test_concurrent_publishers_never_share_or_skip_a_version(redis_server, unique):
    from zoo_store.connection import connect

    numbers: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        store = VersionStore(connect(redis_server.address), Keys(unique))
        for i in range(10):
            v = store.publish("main", _weights(w * 100 + i), publish_id=f"{w}-{i}", reason="merge",
                              architecture=ARCH).manifest.version
            with lock:
                numbers.append(v)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 41))


def test_retention_deletes_old_data_and_their_events_together(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique), keep_versions=3)
    for i in range(6):
        store.publish("main", _weights(i), publish_id=str(i), reason="merge", architecture=ARCH)
    assert store.versions("main") == [4, 5, 6]
    with pytest.raises(VersionNotFound):
        store.weights("main", 3)
    follower = Follower(redis_client, prefix=unique)
    stop = threading.Event()
    seen = []
    for event in follower.events(from_version=1, block_ms=100, stop=stop):
        seen.append(event.version)
        follower.load(event.version)  # every announced version is loadable
        if event.version == 6:
            stop.set()
    assert seen == [4, 5, 6]


def test_retention_trims_publish_ids_with_their_versions_and_keeps_the_newest_idempotent(redis_client, unique):
    keys = Keys(unique)
    store = VersionStore(redis_client, keys, keep_versions=2)
    for i in range(5):
        store.publish("main", _weights(i), publish_id=f"id{i}", reason="merge", architecture=ARCH)
    ids = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.line("main").publish_ids).items()}
    assert ids == {"id3": 4, "id4": 5}  # bounded: only the ids of the versions still stored
    again = store.publish("main", _weights(4), publish_id="id4", reason="merge", architecture=ARCH)
    assert not again.created and again.manifest.version == 5 and store.versions("main") == [4, 5]


def test_follower_refuses_tampered_weights_and_bad_signatures(redis_client, unique):
    keys = Keys(unique)
    store = VersionStore(redis_client, keys, signing_key=b"secret")
    store.publish("main", _weights(0), publish_id="x", reason="merge", architecture=ARCH)
    good = Follower(redis_client, prefix=unique, signing_key=b"secret")
    manifest, state = good.load(1)
    assert manifest.signature and set(state) >= {"head.weight"}
    with pytest.raises(VerificationError, match="signature is invalid"):
        Follower(redis_client, prefix=unique, signing_key=b"other").load(1)
    redis_client.set(keys.line("main").weights(1), _weights(1))
    with pytest.raises(VerificationError, match="sha256 does not match"):
        good.load(1)


def test_unsigned_manifest_refused_when_a_signature_is_required(redis_client, unique):
    VersionStore(redis_client, Keys(unique)).publish("main", _weights(0), publish_id="u", reason="merge",
                                                      architecture=ARCH)
    with pytest.raises(VerificationError, match="unsigned"):
        Follower(redis_client, prefix=unique, require_signature=True).load(1)


def test_follow_from_latest_and_next(redis_client, unique):
    store = VersionStore(redis_client, Keys(unique))
    for i in range(3):
        store.publish("main", _weights(i), publish_id=str(i), reason="merge", architecture=ARCH)
    follower = Follower(redis_client, prefix=unique)
    stop = threading.Event()
    first_latest = next(iter(follower.events(from_version="latest", block_ms=100, stop=stop)))
    assert first_latest.version == 3
    got = []

    def follow_next():
        for event in follower.events(from_version="next", block_ms=100, stop=stop):
            got.append(event.version)
            stop.set()

    t = threading.Thread(target=follow_next)
    t.start()
    import time
    time.sleep(0.3)
    store.publish("main", _weights(9), publish_id="9", reason="merge", architecture=ARCH)
    t.join(timeout=5)
    assert got == [4]


def test_watch_says_in_one_line_that_a_version_is_gone(redis_server, redis_client, unique, capsys):
    """``filial watch --load`` on a version whose weights retention removed: a JSON line saying so, no traceback."""
    from daemon.cli import main

    VersionStore(redis_client, Keys(unique)).publish("main", _weights(0), publish_id="a", reason="bootstrap",
                                                     architecture=ARCH)
    redis_client.delete(Keys(unique).line("main").weights(1))
    assert main(["watch", "--redis-url", redis_server.address, "--prefix", unique, "--load", "--count", "1",
                 "--timeout", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and '"loaded": false' in lines[0] and "version 1 is gone" in lines[0]


# --- a follower's read of the weights (VersionStore.read_weights): chunks, requests in flight, failures
def _stored(client, prefix: str, weights: bytes) -> VersionStore:
    store = VersionStore(client, Keys(prefix))
    store.publish("main", weights, publish_id="r", reason="bootstrap", architecture=ARCH)
    return store


@pytest.mark.parametrize("size", [1, 6, 7, 8, 20, 21, 70])
@pytest.mark.parametrize("single_connection", [False, True])
def test_weights_read_in_chunks_are_the_weights_and_their_digest(redis_server, unique, monkeypatch, size,
                                                                 single_connection):
    import hashlib

    import redis

    import zoo_store.versions as versions

    monkeypatch.setattr(versions, "WEIGHTS_CHUNK", 7)   # sizes below, at and across chunk boundaries
    client = redis.Redis.from_url(redis_server.address, single_connection_client=single_connection)
    weights = bytes(range(size))
    store = _stored(client, unique, weights)
    assert store.weights_size("main", 1) == size
    buffer, digest = store.read_weights("main", 1, size)
    assert not buffer.readonly and buffer.tobytes() == weights and digest == hashlib.sha256(weights).hexdigest()
    assert client.get(Keys(unique).line("main").manifest(1)) is not None   # the connection is in step
    client.close()


def test_weights_gone_mid_read_say_so_and_leave_the_connection_usable(redis_client, unique, monkeypatch):
    import zoo_store.versions as versions

    monkeypatch.setattr(versions, "WEIGHTS_CHUNK", 4)
    store = _stored(redis_client, unique, bytes(64))
    absorb = VersionStore._absorb

    def expire_after_first(*args):
        absorb(*args)
        redis_client.delete(Keys(unique).line("main").weights(1))   # retention, between two chunks

    monkeypatch.setattr(VersionStore, "_absorb", staticmethod(expire_after_first))
    with pytest.raises(VersionNotFound, match="went while being read"):
        store.read_weights("main", 1, 64)
    # the replies still in flight went with their connection: the next command gets its own reply
    redis_client.set(f"{unique}:probe", b"mine")
    assert redis_client.get(f"{unique}:probe") == b"mine" and redis_client.ping()
    with pytest.raises(VersionNotFound, match="has no weights"):
        store.weights_size("main", 1)


def test_a_connection_lost_mid_read_is_retried(redis_server, redis_client, unique, monkeypatch):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    import zoo_store.versions as versions

    monkeypatch.setattr(versions, "WEIGHTS_CHUNK", 16)
    name = f"reader-{unique}"
    reader = redis.Redis.from_url(redis_server.address, client_name=name, retry=Retry(NoBackoff(), 2),
                                  retry_on_error=[redis.ConnectionError])
    weights = bytes(range(200))
    store = _stored(reader, unique, weights)
    absorb, killed = VersionStore._absorb, []

    def kill_once(*args):
        absorb(*args)
        if not killed:   # the server drops the reader's connection with requests in flight
            killed.extend(c["id"] for c in redis_client.client_list() if c.get("name") == name)
            for client_id in killed:
                redis_client.client_kill_filter(_id=client_id)

    monkeypatch.setattr(VersionStore, "_absorb", staticmethod(kill_once))
    buffer, _ = store.read_weights("main", 1, len(weights))
    assert killed and buffer.tobytes() == weights
    reader.close()


def test_a_follower_refuses_a_wrong_size_before_reading_the_weights(redis_client, unique, monkeypatch):
    store = _stored(redis_client, unique, _weights(0))
    redis_client.append(Keys(unique).line("main").weights(1), b"extra")
    monkeypatch.setattr(VersionStore, "read_weights", lambda *a: pytest.fail("the weights were read"))
    with pytest.raises(VerificationError, match="bytes, manifest says"):
        Follower(redis_client, prefix=unique).load(1)
    assert store.weights_size("main", 1) == len(_weights(0)) + 5


def _address(buffer: memoryview) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()


def test_a_read_buffer_is_reused_only_once_nothing_holds_it(redis_client, unique):
    from zoo_store.tensors import decode

    weights = _weights(0)
    store = _stored(redis_client, unique, weights)
    first, _ = store.read_weights("main", 1, len(weights))
    address = _address(first)
    state = decode(first)                    # tensors viewing the buffer, as a follower's model holds them
    expected = {k: v.clone() for k, v in state.items()}
    del first
    second, _ = store.read_weights("main", 1, len(weights))
    assert _address(second) != address       # still held through the tensors: a new buffer
    intact = all(torch.equal(state[k], v) for k, v in expected.items())   # not in an assert: pytest's
    del state                                                            # rewriting would keep the tensors
    assert intact
    third, _ = store.read_weights("main", 1, len(weights))
    assert _address(third) == address and third.tobytes() == weights   # nothing held it: read into again



def test_a_follower_waits_with_a_touched_buffer_ready_for_the_next_version(redis_client, unique):
    store = _stored(redis_client, unique, _weights(0))
    follower = Follower(redis_client, prefix=unique)
    follower.store.ready_next_buffer()                    # nothing read yet: nothing to size a buffer by
    assert follower.store._buffers == []
    events = follower.events(from_version=1, block_ms=50)
    assert next(events).version == 1
    _, state = follower.load(1)                           # its tensors hold the buffer it was read into
    assert len(follower.store._buffers) == 1
    store.publish("main", _weights(1), publish_id="second", reason="test", architecture=ARCH)
    assert next(events).version == 2                      # resuming after version 1 readied a spare
    first, spare = follower.store._buffers
    assert spare.size == first.size and not spare.any()   # the size of the last read, touched (zeroed)
    spare_address, spare_size = spare.ctypes.data, spare.size
    del first, spare
    _, second = follower.load(2)
    assert all(0 <= t.data_ptr() - spare_address < spare_size for t in second.values())   # read into it
    assert all(t.data_ptr() - spare_address >= spare_size or t.data_ptr() < spare_address
               for t in state.values())                   # version 1's tensors were left alone
