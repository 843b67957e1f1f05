"""A follower in another language verifies what a real daemon publishes: the Node.js follower in
node_follower/ checks sha256 and the HMAC (RFC 8785 JSON) of every version, merges included (their
floats, e.g. ``1.0``, are what Python-formatted canonical JSON got wrong). It installs its npm
packages into a temporary directory; without Node.js or npm (or the registry) it skips, saying why."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.service.service import Service
from tests.helpers import produce_tabular, run_in_thread, service_settings, wait_until
from zoo_store.connection import connect
from zoo_store.follow import Follower
from zoo_store.keys import Keys

FOLLOWER = Path(__file__).parent / "node_follower"
KEY = "node-and-python-share-this-key"


@pytest.fixture(scope="module")
def node_follower(tmp_path_factory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("Node.js and npm are needed for the cross-language follower (not found on PATH)")
    work = tmp_path_factory.mktemp("node_follower")
    for name in ("package.json", "follower.mjs"):
        shutil.copy(FOLLOWER / name, work / name)
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"npm install of the follower's packages failed: {done.stderr.strip()[-300:]}")
    return work / "follower.mjs"


def test_a_nodejs_follower_verifies_every_version_a_daemon_publishes(node_follower, kafka, redis_server, unique):
    settings = service_settings(kafka.address, redis_server.address, unique, signing_key=KEY)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 6, "plain", rows=64)
        produce_tabular(kafka.address, settings.kafka.topic, "perm", 6, "perm", rows=64, permute_seed=5)
        assert wait_until(lambda: service.engine.counters.batches >= 12)
        service.merge_now()
    finally:
        service.stop()
        thread.join(timeout=60)
    line = settings.publish.line
    client = connect(redis_server.address)
    versions = service.versions.versions(line)
    raw = {v: client.get(Keys(unique).line(line).manifest(v)).decode() for v in versions}
    reasons = {v: json.loads(text)["reason"] for v, text in raw.items()}
    assert "merge" in reasons.values(), reasons
    # the case that broke: integral floats, which Python writes as 1.0 and JavaScript as 1
    assert any(re.search(r"\d\.0[,}\]]", text) for v, text in raw.items() if reasons[v] == "merge")

    done = subprocess.run(["node", str(node_follower), redis_server.address, unique, line, KEY],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = [json.loads(row) for row in done.stdout.splitlines()]
    assert [row["version"] for row in seen] == versions
    assert all(row["sha256_ok"] and row["hmac_ok"] and row["scheme"] == "hmac-sha256-jcs" for row in seen), seen

    # and the Python follower agrees; a wrong key fails in Node as it does here
    follower = Follower(client, prefix=unique, signing_key=KEY.encode())
    assert [follower.load(v)[0].version for v in versions] == versions
    wrong = subprocess.run(["node", str(node_follower), redis_server.address, unique, line, "another-key"],
                           capture_output=True, text=True, timeout=60)
    assert [json.loads(row)["hmac_ok"] for row in wrong.stdout.splitlines()] == [False] * len(versions)
