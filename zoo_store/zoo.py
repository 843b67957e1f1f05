"""The model zoo in Redis: the served model's children, each a member on its own line, with the
index and event stream that inference servers follow (seed 003's zoo; README, "The zoo").

A member is a line ``{line}.{child_id}`` published with :meth:`VersionStore.publish` (manifest
``kind="member"``, its slices, held-out metrics per slice, and a fingerprint file), then entered in
``{p}:zoo`` (member line -> latest version) with a ``member.published`` event on ``{p}:zoo:events``.
Publishing the version first means an index entry or event never points at missing data; a crash
in between leaves a line that the member's next version enters.

Retention keeps the zoo inside a count and a byte budget (Redis memory): after each entry the
members whose newest version is oldest leave first (every version, then ``member.removed``), but
never the member just entered. A member also leaves when the daemon retires its child.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

import redis

from zoo_store.follow import Follower, LoadedVersion, read_stream
from zoo_store.keys import Keys
from zoo_store.models import ZooEvent, utc_now
from zoo_store.versions import VersionNotFound, VersionStore

log = logging.getLogger("filial.zoo_store")

ZOO_EVENTS_MAXLEN = 10_000


class ZooStore:
    def __init__(self, versions: VersionStore, max_members: int = 32, max_bytes: int = 256 * 2**20) -> None:
        self.versions = versions
        self.client = versions.client
        self.keys = versions.keys
        self.max_members = max_members
        self.max_bytes = max_bytes

    def members(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(self.keys.zoo).items()}

    def enter(self, line: str, version: int, reason: str = "") -> list[str]:
        """Index ``line`` v``version`` (already published) as a member and announce it; returns the
        members retention removed to stay within budget."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.zoo, line, version)
            pipe.xadd(self.keys.zoo_events, {"event": self._event("member.published", line, version, reason)},
                      maxlen=ZOO_EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        self.client.publish(self.keys.zoo_events, self._event("member.published", line, version, reason))
        return self._enforce_budget(keep=line)

    def remove(self, line: str, reason: str) -> None:
        """A member leaves: the index entry and the event first (a follower stops using it), then its data."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.zoo, line)
            pipe.xadd(self.keys.zoo_events, {"event": self._event("member.removed", line, None, reason)},
                      maxlen=ZOO_EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        self.client.publish(self.keys.zoo_events, self._event("member.removed", line, None, reason))
        self.versions.delete_line(line)
        log.info("zoo member %s removed (%s)", line, reason)

    def _enforce_budget(self, keep: str) -> list[str]:
        members = self.members()
        sizes = {line: self.versions.stored_bytes(line) for line in members}
        removed: list[str] = []
        for line in sorted(members, key=lambda m: self._published_at(m, members[m])):
            over_count = len(members) - len(removed) > self.max_members
            over_bytes = sum(size for m, size in sizes.items() if m not in removed) > self.max_bytes
            if not (over_count or over_bytes):
                break
            if line == keep:
                continue
            self.remove(line, "retention: " + ("more than %d members" % self.max_members if over_count
                                               else "over %d bytes" % self.max_bytes))
            removed.append(line)
        if sum(size for m, size in sizes.items() if m not in removed) > self.max_bytes:
            log.warning("zoo holds %s alone and it is over the %d-byte budget: it stays (a zoo is never "
                        "emptied by retention); raise zoo.max_bytes", keep, self.max_bytes)
        return removed

    def _published_at(self, line: str, version: int) -> str:
        try:
            return self.versions.manifest(line, version).created_at
        except VersionNotFound:
            return ""

    @staticmethod
    def _event(kind: str, line: str, version: int | None, reason: str) -> str:
        return ZooEvent(type=kind, line=line, version=version, created_at=utc_now(), reason=reason).model_dump_json()


class ZooFollower:
    """Follow the zoo: its members now, the events that change it, and verified loads of members."""

    def __init__(self, client: redis.Redis, prefix: str = "filial", signing_key: bytes | None = None,
                 require_signature: bool | None = None) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.prefix = prefix
        self.signing_key = signing_key
        self.require_signature = require_signature

    def members(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(self.keys.zoo).items()}

    def last_event_id(self) -> str:
        """The id to pass to :meth:`events` to see only what happens after now."""
        last = self.client.xrevrange(self.keys.zoo_events, count=1)
        return last[0][0].decode() if last else "0-0"

    def events(self, from_id: str = "$", block_ms: int = 1000,
               stop: threading.Event | None = None) -> Iterator[ZooEvent]:
        """Yield zoo events after ``from_id`` ("0" every retained one; "$" only new ones; or an id
        from :meth:`last_event_id`), blocking for more until ``stop`` is set; rides out Redis outages."""
        last_id = self.last_event_id() if from_id == "$" else from_id
        for fields in read_stream(self.client, self.keys.zoo_events, last_id, block_ms, stop):
            yield ZooEvent.model_validate_json(fields[b"event"])

    def load(self, line: str, version: int) -> LoadedVersion:
        return Follower(self.client, line=line, prefix=self.prefix, signing_key=self.signing_key,
                        require_signature=self.require_signature).load_version(version)
