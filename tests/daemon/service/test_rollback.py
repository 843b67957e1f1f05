"""`filial rollback` on real servers: an earlier version republished as the newest, verified first,
followed without a gap, and served (and learned on from) by the running daemon."""

from __future__ import annotations

import json

import torch

from daemon.cli import main as cli_main
from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.follow import Follower


def test_a_rollback_is_the_next_version_and_the_daemon_serves_it(kafka, redis_server, unique, produce_tabular,
                                                                 capsys):
    settings = service_settings(kafka.address, redis_server.address, unique)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    service = Service(settings)
    thread = run_in_thread(service)
    args = ["rollback", "--redis-url", redis_server.address, "--prefix", unique]
    try:
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 6, "plain", rows=64)
        assert wait_until(lambda: service.engine.counters.batches >= 6 and (service.engine.served_version or 0) >= 1), \
            (service.engine.counters, service.engine.served_version)
        for _ in range(5):   # merges the daemon still has due run now, so it publishes nothing meanwhile
            if service.merge_now() is None:
                break
        capsys.readouterr()
        latest = service.versions.latest("main")
        assert cli_main([*args, "--to", str(latest)]) == 2   # not earlier than the latest: nothing to go back to
        assert "earlier version" in capsys.readouterr().err
        # a newer version (as the daemon would publish it): the daemon adopts it at its next merge
        follower = Follower(service.redis, prefix=unique)
        _, v1 = follower.load(1)
        newer = {k: v + 0.5 for k, v in v1.items()}
        from daemon.service.publisher import serialize

        service.versions.publish("main", serialize(newer)[0], publish_id="test-newer", reason="merge",
                                 parent_version=latest, base_version=1,
                                 architecture=service.engine.architecture.model_dump())
        assert cli_main([*args, "--to", "1"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["version"], out["rollback_of"], out["parent_version"]) == (latest + 2, 1, latest + 1)
        manifest, weights = follower.load(latest + 2)
        assert manifest.reason == "rollback" and manifest.rollback_of == 1
        assert all(torch.equal(weights[k], v1[k]) for k in v1)
        service.merge_now()   # the daemon takes the newer version, then the rollback, and learns on from v1's weights
        assert service.engine.served_version >= latest + 2
        published = service.engine._state.published_state
        if service.engine.served_version == latest + 2:   # (a merge of its own may follow the rollback)
            assert all(torch.equal(published[k], v1[k]) for k in v1)
        assert cli_main([*args, "--to", "9"]) == 2
        assert "earlier version" in capsys.readouterr().err
    finally:
        service.stop()
        thread.join(timeout=60)
