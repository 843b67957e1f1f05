"""The embedded Redis-protocol server: what it is started with matters to publish latency."""

from __future__ import annotations

import sys
import time

import pytest
import redis

from daemon.service.embedded import EmbeddedRedis

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_a_new_version_reuses_the_memory_a_deleted_one_gave_back():
    """A 40 MB value (a 10M-parameter version) written after retention deleted the previous one takes
    that one's memory, instead of ~9,750 pages of fresh memory for the kernel to fault in."""
    value = bytes(40 << 20)
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.address)
        client.set("v1", memoryview(value))
        client.delete("v1")   # a string is freed before DEL returns, lazyfree or not (its free effort is 1)
        # versions come seconds apart; written within ~0.1 s of each other the second still faulted every
        # page anew (measured), as the server had not yet let go of what it held from the first write
        time.sleep(0.5)
        before = _minor_faults(server._proc.pid)
        client.set("v2", memoryview(value))
        faults = _minor_faults(server._proc.pid) - before
        client.close()
    assert faults < 2_000, f"{faults} page faults to store a value the size of one just deleted"
