"""Publishing versions: atomic, monotonic, gap-free, idempotent (docs/architecture.md, invariant 2).

One optimistic transaction (WATCH latest + publish ids, MULTI ... EXEC) writes the weights, the
manifest, the new ``latest`` and the stream event together, so a follower can never see an
event whose data is missing, two workers can never take the same number (one EXEC fails and
retries with the next), and a crash between allocation and write leaves no gap. The
``publish_id`` makes a retried publish (e.g. after a timeout on EXEC's reply) return the
version already written instead of announcing it twice.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy
import redis

from zoo_store.keys import Keys, event_id
from zoo_store.lease import Fenced
from zoo_store.models import Manifest, VersionEvent, sha256_hex, utc_now

log = logging.getLogger("filial.zoo_store")
WEIGHTS_CHUNK = 1 << 20   # bytes per GETRANGE when a follower reads weights (VersionStore.read_weights)
WEIGHTS_AHEAD = 2         # GETRANGEs sent before the reply to the current one is read
READ_BUFFERS = 2          # the last read buffers a follower keeps to read the next version into (VersionStore._buffer)


class VersionNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    created: bool  # False when publish_id had already been published


class VersionStore:
    def __init__(self, client: redis.Redis, keys: Keys, signing_key: bytes | None = None,
                 keep_versions: int = 10) -> None:
        self.client = client
        self.keys = keys
        self.signing_key = signing_key
        self.keep_versions = keep_versions
        self._buffers: list[numpy.ndarray] = []   # newest first
        self._buffers_lock = threading.Lock()
        self._last_read_size: int | None = None

    def latest(self, line: str) -> int | None:
        raw = self.client.get(self.keys.line(line).latest)
        return int(raw) if raw is not None else None

    def lines(self) -> list[str]:
        return sorted(v.decode() for v in self.client.smembers(self.keys.lines))

    def manifest(self, line: str, version: int) -> Manifest:
        raw = self.client.get(self.keys.line(line).manifest(version))
        if raw is None:
            raise VersionNotFound(f"{line} v{version} has no manifest (never published or expired)")
        return Manifest.from_stored(raw)

    def weights(self, line: str, version: int) -> bytes:
        raw = self.client.get(self.keys.line(line).weights(version))
        if raw is None:
            raise VersionNotFound(f"{line} v{version} has no weights (never published or expired)")
        return raw

    def weights_size(self, line: str, version: int) -> int:
        """The stored weights' length in bytes (STRLEN), without reading them."""
        size = self.client.strlen(self.keys.line(line).weights(version))
        if not size:
            raise VersionNotFound(f"{line} v{version} has no weights (never published or expired)")
        return size

    def read_weights(self, line: str, version: int, size: int) -> tuple[memoryview, str]:
        """The first ``size`` bytes of a version's weights (:meth:`weights_size`) in a writable buffer of
        their own, and their sha256 (hex), hashed as they arrive.

        Read in GETRANGE chunks of :data:`WEIGHTS_CHUNK`: one GET of 40 MB costs 80-90 ms in redis-py's reply
        parser (it grows its buffer to the whole reply, then copies it into the bytes object); the chunks
        go into a buffer the tensors can then view instead of copying it (:func:`zoo_store.tensors.decode`).
        :data:`WEIGHTS_AHEAD` requests are kept in flight on one connection, so Redis sends the next
        chunks while this one is hashed (40 MB on the 2 shared cores: 85 -> 70 ms, median); a client on
        a single connection, or one that is not a plain ``redis.Redis``, asks for one chunk at a time.
        The buffer is a numpy array's, left uninitialised (a ``bytearray`` zero-fills its 40 MB first)
        and, numpy's default on Linux, backed by huge pages (81 -> 67 ms for the whole read); one of the
        last :data:`READ_BUFFERS` of the same size is reused once nothing holds it (:meth:`_buffer`).

        A version is written once, in one transaction; should it be deleted while being read (retention),
        a chunk comes back short and this raises :class:`VersionNotFound`; anything else that changed it
        shows in the digest. A connection lost mid-read is retried as the client retries commands."""
        key = self.keys.line(line).weights(version)
        self._last_read_size = size
        spans = [(start, min(start + WEIGHTS_CHUNK, size)) for start in range(0, size, WEIGHTS_CHUNK)]
        pool = getattr(self.client, "connection_pool", None)
        if not (isinstance(self.client, redis.Redis) and self.client.connection is None
                and isinstance(pool, redis.ConnectionPool)):
            return self._read_in_turn(line, version, key, size, spans)
        retry = getattr(self.client, "get_retry", lambda: None)()
        if retry is None:
            return self._read_ahead(line, version, key, size, spans, pool)
        return retry.call_with_retry(lambda: self._read_ahead(line, version, key, size, spans, pool),
                                     lambda error: None)

    @staticmethod
    def _absorb(line: str, version: int, chunk: bytes, start: int, end: int, view: memoryview, digest) -> None:
        if len(chunk) != end - start:
            raise VersionNotFound(f"{line} v{version}'s weights went while being read (expired)")
        digest.update(chunk)
        view[start:end] = chunk

    def _buffer(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes for a version's weights: one of the last read ones when
        nothing holds it any more (the tensors decoded from it, or the model that adopted them, gone),
        else a new one. Memory the process has already touched: a fresh 40 MB is ~10,000 page faults,
        and on a virtual machine the kernel's share of them alone took 40-250 ms (README "Throughput").
        Once the caller drops what it read, at most :data:`READ_BUFFERS` buffers stay allocated."""
        with self._buffers_lock:   # the check and the view that marks it taken, as one step
            free = self._free(size)
            if free is not None:
                self._buffers.insert(0, self._buffers.pop(free))
                return memoryview(self._buffers[0])
            array = numpy.empty(size, dtype=numpy.uint8)
            self._buffers = [array, *self._buffers][:READ_BUFFERS]
            return memoryview(array)

    def _free(self, size: int) -> int | None:
        """The index of a kept buffer of ``size`` bytes that nothing holds (called under the lock)."""
        for i in range(len(self._buffers)):
            # held only by this list and getrefcount's argument: no view, no tensor (no loop name or
            # enumerate tuple either, which would hold it too)
            if self._buffers[i].size == size and sys.getrefcount(self._buffers[i]) == 2:
                return i
        return None

    def ready_next_buffer(self) -> None:
        """Have a free read buffer of the last read's size, its memory touched, for the next version:
        called while a follower waits (:meth:`zoo_store.follow.Follower.events`), so a follower's second
        version does not fault in fresh memory on its way to the model (40 MB: 100-200 ms of stall
        measured on this project's virtual machines, the slowest of 30 publishes). A no-op before any
        read, and while a buffer of that size is free."""
        size = self._last_read_size
        if size is None:
            return
        with self._buffers_lock:
            if self._free(size) is not None:
                return
        spare = numpy.empty(size, dtype=numpy.uint8)
        spare.fill(0)   # outside the lock: a read may take a free buffer meanwhile
        with self._buffers_lock:
            # behind the newest, which the follower's model holds: when trimmed to READ_BUFFERS, an older
            # buffer leaves the list (still alive while something holds it), not this one
            self._buffers = [*self._buffers[:1], spare, *self._buffers[1:]][:READ_BUFFERS]

    def _read_in_turn(self, line: str, version: int, key: str, size: int,
                      spans: list[tuple[int, int]]) -> tuple[memoryview, str]:
        view, digest = self._buffer(size), hashlib.sha256()
        for start, end in spans:
            self._absorb(line, version, self.client.getrange(key, start, end - 1), start, end, view, digest)
        return view, digest.hexdigest()

    def _read_ahead(self, line: str, version: int, key: str, size: int, spans: list[tuple[int, int]],
                    pool: redis.ConnectionPool) -> tuple[memoryview, str]:
        view, digest = self._buffer(size), hashlib.sha256()
        try:
            conn = pool.get_connection()
        except TypeError:   # redis-py before 5.3 wants the command's name
            conn = pool.get_connection("GETRANGE")
        try:
            for start, end in spans[:WEIGHTS_AHEAD]:
                conn.send_command("GETRANGE", key, start, end - 1)
            for i, (start, end) in enumerate(spans):
                if i + WEIGHTS_AHEAD < len(spans):
                    ahead_start, ahead_end = spans[i + WEIGHTS_AHEAD]
                    conn.send_command("GETRANGE", key, ahead_start, ahead_end - 1, check_health=False)
                self._absorb(line, version, conn.read_response(disable_decoding=True), start, end, view, digest)
        except BaseException:
            conn.disconnect()   # replies may still be in flight: the connection cannot serve another command
            raise
        finally:
            pool.release(conn)
        return view, digest.hexdigest()

    def versions(self, line: str) -> list[int]:
        """Versions still stored (newest last), from the event stream."""
        entries = self.client.xrange(self.keys.line(line).events)
        return [int(entry_id.decode().split("-")[0]) for entry_id, _ in entries]

    def fingerprint(self, line: str, version: int) -> bytes:
        raw = self.client.get(self.keys.line(line).fingerprint(version))
        if raw is None:
            raise VersionNotFound(f"{line} v{version} has no fingerprint (never published or expired)")
        return raw

    def publish(self, line: str, weights: bytes, *, publish_id: str, reason: str,
                architecture: dict[str, Any], fingerprint: bytes | None = None,
                fencing_token: int | None = None, weights_sha256: str | None = None,
                **manifest_fields: Any) -> Published:
        """Write version ``latest + 1`` of ``line``: weights, manifest, the optional fingerprint file
        (its sha256 and size go into the manifest, so the signature covers it) and the event.
        With ``fencing_token`` (the merge leader's, :mod:`zoo_store.lease`), the same transaction
        checks it is still the newest: :class:`Fenced` otherwise, and nothing is written.
        ``weights_sha256``: the weights' digest when the caller has it already (hashing 40 MB takes
        33 ms); it is what the manifest and the event carry, so it must be the weights' own."""
        lk = self.keys.line(line)
        digest = weights_sha256 or sha256_hex(weights)
        if fencing_token is not None:
            manifest_fields["fencing_token"] = fencing_token
        if fingerprint is not None:
            manifest_fields.update(fingerprint_sha256=sha256_hex(fingerprint), fingerprint_bytes=len(fingerprint))
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(lk.latest, lk.publish_ids, *([self.keys.leader_token] if fencing_token else []))
                    if fencing_token is not None:
                        newest = int(pipe.get(self.keys.leader_token) or 0)
                        if newest != fencing_token:
                            pipe.reset()
                            raise Fenced(f"fencing token {fencing_token} is stale (the lease's newest is {newest}): "
                                         f"another process leads; not publishing {line}")
                    already = pipe.hget(lk.publish_ids, publish_id)
                    if already is not None:
                        pipe.reset()
                        return Published(self.manifest(line, int(already)), created=False)
                    # never below the parent: a Redis that came back empty must not reuse numbers
                    # followers have already seen
                    same_line = manifest_fields.get("parent_line") in (None, line)
                    floor = int(manifest_fields.get("parent_version") or 0) if same_line else 0
                    version = max(int(pipe.get(lk.latest) or 0), floor) + 1
                    manifest = Manifest(line=line, version=version, created_at=utc_now(), reason=reason,
                                        architecture=architecture, weights_sha256=digest,
                                        weights_bytes=len(weights), publish_id=publish_id,
                                        **manifest_fields)
                    if self.signing_key:
                        manifest = manifest.sign(self.signing_key)
                    event = VersionEvent(line=line, version=version, created_at=manifest.created_at,
                                         reason=reason, base_version=manifest.base_version,
                                         parent_version=manifest.parent_version,
                                         weights_key=lk.weights(version), manifest_key=lk.manifest(version),
                                         weights_sha256=digest, metrics=manifest.metrics)
                    event_json = event.model_dump_json()
                    pipe.multi()
                    # a memoryview is sent as it is: with hiredis, redis-py packs a bytes argument into a
                    # fresh copy of the whole command (40 MB: 120 -> 45 ms for this SET)
                    pipe.set(lk.weights(version), memoryview(weights))
                    pipe.set(lk.manifest(version), manifest.model_dump_json())
                    if fingerprint is not None:
                        pipe.set(lk.fingerprint(version), fingerprint)
                    pipe.set(lk.latest, version)
                    pipe.hset(lk.publish_ids, publish_id, version)
                    pipe.sadd(self.keys.lines, line)
                    pipe.xadd(lk.events, {"event": event_json}, id=event_id(version))
                    pipe.execute()
                except redis.WatchError:
                    continue  # another publisher took this number: take the next
            break
        self.client.publish(lk.events, event_json)
        self._expire_old(line, version)
        log.info("published %s v%d (%s, %d bytes, sha256 %s…)", line, version, reason, len(weights), digest[:12])
        return Published(manifest, created=True)

    def _expire_old(self, line: str, newest: int) -> None:
        """Delete versions older than the last ``keep_versions``, their events and their publish ids.

        Dropping an old version's publish id keeps the exactly-once guarantee: the publisher
        retries one job at a time, in order, until it is written, so the only publish that can be
        retried after an ambiguous EXEC is the newest version on the line, and retention always
        keeps that one (``keep_versions >= 1``). An id whose version is gone could only answer
        with a manifest that no longer exists, so it goes with the data, in the same transaction.
        """
        oldest_kept = newest - self.keep_versions + 1
        if oldest_kept <= 1:
            return
        lk = self.keys.line(line)
        stale = [v for v in self.versions(line) if v < oldest_kept]
        stale_ids = [pid for pid, v in self.client.hscan_iter(lk.publish_ids) if int(v) < oldest_kept]
        if not stale and not stale_ids:
            return
        with self.client.pipeline(transaction=True) as pipe:
            # trim the stream first: an event must never outlive its data
            pipe.xtrim(lk.events, minid=event_id(oldest_kept), approximate=False)
            for v in stale:
                pipe.delete(lk.weights(v), lk.manifest(v), lk.fingerprint(v))
            if stale_ids:
                pipe.hdel(lk.publish_ids, *stale_ids)
            pipe.execute()

    def rollback(self, line: str, to_version: int) -> Published:
        """Republish version ``to_version``'s weights (and fingerprint) as the line's next version:
        numbers stay monotonic, followers move back without a gap, and the manifest says
        ``reason="rollback"``, ``rollback_of``. The caller verifies ``to_version`` first."""
        old = self.manifest(line, to_version)
        weights = self.weights(line, to_version)
        fingerprint = self.fingerprint(line, to_version) if old.fingerprint_sha256 else None
        latest = self.latest(line)
        carried = old.model_dump(include={"base_version", "lineage", "metrics", "merge", "continual", "kind", "slices",
                                          "spawn_method", "fingerprint_slices", "parent_line"})
        return self.publish(line, weights, publish_id=f"rollback:{latest}:{to_version}", reason="rollback",
                            architecture=old.architecture, fingerprint=fingerprint, parent_version=latest,
                            rollback_of=to_version, **carried)

    def stored_bytes(self, line: str) -> int:
        """Bytes of every version still stored on ``line`` (weights, manifests, fingerprints)."""
        lk = self.keys.line(line)
        keys = [k for v in self.versions(line) for k in (lk.weights(v), lk.manifest(v), lk.fingerprint(v))]
        if not keys:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.strlen(key)
            return sum(pipe.execute())

    def delete_line(self, line: str) -> None:
        """Remove a line and every version of it (a zoo member leaving the zoo): the event stream goes
        first, in the same transaction, so no event outlives its data."""
        lk = self.keys.line(line)
        versions = self.versions(line)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(lk.events, lk.latest, lk.publish_ids)
            for v in versions:
                pipe.delete(lk.weights(v), lk.manifest(v), lk.fingerprint(v))
            pipe.srem(self.keys.lines, line)
            pipe.execute()
