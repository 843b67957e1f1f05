"""The merge leader's lease: at most one process publishes the served line at a time, and one that
lost the lease can never publish again (issue 13; README, "Scaling out").

``{p}:leader`` holds ``{"holder", "token"}`` with a time to live; ``{p}:leader:token`` is a counter
that only grows. Taking a free lease increments the counter: the new holder's **fencing token** is
larger than every earlier holder's. The holder renews before the time to live runs out.

Fencing (Kleppmann, "How to do distributed locking", 2016): a lease alone cannot stop a holder
that paused (a GC pause, a stalled GPU, a network partition) past its time to live from acting on
a lease it no longer holds. So the *storage* checks the token: :meth:`VersionStore.publish` with
``fencing_token`` WATCHes ``{p}:leader:token`` in the same transaction that writes the version and
refuses (:class:`Fenced`) when the counter has moved past the caller's token. A former leader's
publish therefore fails even if it wakes up mid-transaction: the new leader's increment aborts the
EXEC, and the retry sees the larger token.

Failure modes: the holder dies: the lease expires after ``ttl``, another process takes it (the
served line gets no merge for up to ``ttl``; nothing is lost, the next leader merges the zoo). The
holder pauses past ``ttl``: another takes the lease; the paused one's next renew fails and its
publishes are fenced. Redis unreachable: nobody can renew or publish; after it returns the lease
may have expired and is taken again (possibly by the same process, with a new token). Redis
failover to a replica that missed the last increment could hand out a token twice: run Redis with
``appendfsync always`` or ``WAIT`` for replicas where that matters (the same caveat as any
Redis-based lock). Kafka's group coordinator fences consumers the same way (a generation id checked
on offset commits); this lease fences the other shared resource, the served line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from zoo_store.keys import Keys


class Fenced(Exception):
    """A publish with a fencing token older than the lease's newest: this process is no longer the leader."""


# Take the lease if free, renew it if ours: atomically, so two contenders never both take it.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local held = cjson.decode(current)
  if held['holder'] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return held['token']
  end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], cjson.encode({holder = ARGV[1], token = token}), 'PX', ARGV[2])
return token
"""

# Give the lease up only if still ours (an expired lease may already be someone else's).
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['holder'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Holder:
    holder: str
    token: int


class Lease:
    def __init__(self, client: redis.Redis, keys: Keys, holder: str, ttl_seconds: float = 15.0) -> None:
        self.client = client
        self.keys = keys
        self.holder = holder
        self.ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self.token: int | None = None

    def acquire(self) -> int | None:
        """Take or renew the lease; the fencing token while held, else None. Call every ttl/3."""
        token = self._acquire(keys=[self.keys.leader, self.keys.leader_token], args=[self.holder, self.ttl_ms])
        self.token = int(token) if token else None
        return self.token

    def release(self) -> None:
        self._release(keys=[self.keys.leader], args=[self.holder])
        self.token = None

    def current(self) -> Holder | None:
        raw = self.client.get(self.keys.leader)
        return Holder(**json.loads(raw)) if raw else None
