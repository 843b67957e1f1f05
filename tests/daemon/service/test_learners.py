"""Several learners in one consumer group on real servers (issue 13): one merge leader publishes the
served line, fenced by its lease; the others learn their partitions, publish their children to the zoo,
contribute what they learned (merged by the leader through the gate, judged on their rows too) and
follow the leader's versions; every batch is applied once across them; when the leader stops, another
takes the lease and publishes the next versions."""

from __future__ import annotations


from daemon.service.service import Service
from tests.helpers import run_in_thread, service_settings, wait_until
from zoo_store.lease import Lease


def test_one_leader_publishes_and_every_batch_is_applied_once(kafka, redis_server, unique, produce_tabular):
    base = dict(lease_ttl_seconds=2.0, bootstrap_batches=2, accuracy_threshold=0.7, child_size_ratio=0.5,
                merge_trigger="count", merge_after_child_updates=2)
    settings = {name: service_settings(kafka.address, redis_server.address, unique, learner_id=name, **base)
                for name in ("a", "b")}
    topic = settings["a"].kafka.topic
    kafka.create_topics({topic: 2, settings["a"].kafka.dead_letter_topic: 1})
    learners = {name: Service(s) for name, s in settings.items()}
    threads = {name: run_in_thread(learner) for name, learner in learners.items()}
    produced = 0
    try:
        produced += len(produce_tabular(kafka.address, topic, "plain", 6, "plain", rows=96, partition=0))
        produced += len(produce_tabular(kafka.address, topic, "perm", 6, "perm", rows=96, permute_seed=5,
                                        partition=1))
        applied = lambda: sum(learner.engine.counters.batches for learner in learners.values())  # noqa: E731
        assert wait_until(lambda: applied() >= produced, timeout=120), applied()
        assert all(learner.engine.counters.batches for learner in learners.values()), "each owns a partition"
        store = learners["a"].versions
        versions = store.versions("main")
        assert versions == list(range(1, len(versions) + 1)) and versions, versions   # contiguous, no gap
        publishers = {store.manifest("main", v).publisher for v in versions}
        assert len(publishers) == 1, publishers   # one leader wrote the served line
        leader = publishers.pop()
        follower = "b" if leader == "a" else "a"
        latest = store.latest("main")    # the leader may publish again meanwhile: at least this one
        learners[follower].merge_now()   # not the leader: follows the served line, contributes its work
        assert latest <= learners[follower].engine.served_version <= store.latest("main")
        assert learners[follower].metrics.leader._value.get() == 0
        theirs = set(learners[follower].engine._state.buffers.heldout_sets()) - set(
            learners[leader].engine._state.buffers.heldout_sets())
        assert theirs, "the follower learned a slice the leader never saw"
        def served_theirs() -> bool:
            """A version the leader published merged the follower's contribution, judged on its slices."""
            for v in store.versions("main"):
                manifest = store.manifest("main", v)
                if (any(c.startswith("learner:") for c in (manifest.merge or {}).get("children", []))
                        and theirs <= set(manifest.metrics)):
                    return True
            return False

        # a contribution counts only if built on the leader's served version: when the leader published in
        # between (its own merges run between its batches), the follower rebases and contributes again
        for _ in range(5):
            if served_theirs():
                break
            learners[follower].merge_now()
            learners[leader].merge_now()
        assert served_theirs()

        its_slices = set(learners[leader].engine._state.buffers.heldout_sets()) - theirs
        learners[leader].stop()   # gives the lease back
        threads[leader].join(timeout=60)
        moved = "plain" if "plain" in its_slices else "perm"   # the former leader's partition gets more batches
        produced += len(produce_tabular(kafka.address, topic, moved, 4, moved, rows=96, start=6,
                                        partition=0 if moved == "plain" else 1,
                                        permute_seed=None if moved == "plain" else 5))
        assert wait_until(lambda: applied() >= produced, timeout=120), applied()   # its partition moved over
        learners[follower].merge_now()
        assert learners[follower].metrics.leader._value.get() == 1
        token = Lease(learners[follower].redis, store.keys, "probe").current().token
        assert token >= 2   # a new lease, a larger fencing token
        tokens = [store.manifest("main", v).fencing_token for v in store.versions("main")]
        assert None not in tokens and tokens == sorted(tokens), tokens   # each version names its leader's token
        assert applied() == produced   # every batch once, across the rebalance
        # the slice that moved over starts from the rows the former leader contributed, not afresh
        held = learners[follower].engine._state.buffers.heldout
        assert its_slices and all(len(held[s]) > 4 * 96 * 0.2 for s in its_slices), {s: len(held[s]) for s in held}
    finally:
        for name, learner in learners.items():
            learner.stop()
            threads[name].join(timeout=60)


def test_a_partition_moves_after_a_checkpoint_whose_commit_was_lost(kafka, redis_server, unique, produce_tabular,
                                                                    monkeypatch):
    """Found by ``make scale`` (tools/scale.py): a learner's checkpoint is durable but its offset commit
    did not happen (a SIGKILL between the two, chaos's ``checkpoint`` point, or a commit refused during a
    rebalance and the learner killed before the next). The partition's next owner resumes at the group's
    committed offset only, so it applies again what the other learner's checkpoint already holds: twice
    across the group. Expected: the new owner also resumes past the other learners' checkpointed offsets."""
    from consumers.batch_consumer import BatchConsumer
    from kafka.errors import KafkaError

    base = dict(lease_ttl_seconds=2.0, bootstrap_batches=2, checkpoint_every_batches=1)
    settings = {name: service_settings(kafka.address, redis_server.address, unique, learner_id=name, **base)
                for name in ("a", "b")}
    topic = settings["a"].kafka.topic
    kafka.create_topics({topic: 1, settings["a"].kafka.dead_letter_topic: 1})
    produced = len(produce_tabular(kafka.address, topic, "plain", 6, "plain", rows=96, partition=0))

    def lost(self, next_offsets):  # the commit never reaches the broker (the process died first)
        raise KafkaError("killed before the commit")

    monkeypatch.setattr(BatchConsumer, "commit", lost)
    a = Service(settings["a"])
    thread = run_in_thread(a)
    try:
        assert wait_until(lambda: a.engine.counters.batches >= produced, timeout=120)
        assert wait_until(lambda: a.checkpointer.batches_since == 0, timeout=30)   # durable in a's checkpoint
    finally:
        a.stop()
        thread.join(timeout=60)
    monkeypatch.undo()
    b = Service(settings["b"])
    thread = run_in_thread(b)
    try:
        wait_until(lambda: b.engine.counters.batches > 0, timeout=20)
        assert b.engine.counters.batches == 0, f"b applied {b.engine.counters.batches} batches a had applied"
    finally:
        b.stop()
        thread.join(timeout=60)


def test_a_fresh_learner_that_takes_the_lease_learns_on_from_the_served_line(kafka, redis_server, unique,
                                                                             produce_tabular):
    """Found by ``make scale``: the leader bootstraps v1 and dies; a learner that starts without a
    checkpoint (a new pod, or one killed before its first) takes the lease and bootstraps its own model as
    v2 (parent None), discarding v1's lineage; learners serving v1 look for a merge whose parent is 1,
    find none and stay on v1, so their contributions (built on v1) are never merged again. Expected:
    the fresh learner adopts v1 first, and every later version's parent is the one before it."""
    base = dict(lease_ttl_seconds=2.0, bootstrap_batches=2)
    settings = {name: service_settings(kafka.address, redis_server.address, unique, learner_id=name, **base)
                for name in ("a", "b")}
    topic = settings["a"].kafka.topic
    kafka.create_topics({topic: 2, settings["a"].kafka.dead_letter_topic: 1})
    produce_tabular(kafka.address, topic, "plain", 4, "plain", rows=96, partition=0)
    a = Service(settings["a"])
    thread = run_in_thread(a)
    try:
        assert wait_until(lambda: (a.versions.latest("main") or 0) >= 1, timeout=120)
    finally:
        a.stop()   # gives the lease back
        thread.join(timeout=60)
    b = Service(settings["b"])
    thread = run_in_thread(b)
    try:
        produce_tabular(kafka.address, topic, "perm", 4, "perm", rows=96, permute_seed=5, partition=1)
        assert wait_until(lambda: b.engine.counters.batches >= 4, timeout=120)
        b.merge_now()
        store = b.versions
        for v in store.versions("main")[1:]:
            manifest = store.manifest("main", v)
            assert (manifest.reason, manifest.parent_version) != ("bootstrap", None), f"v{v}: a second bootstrap"
            assert manifest.parent_version == v - 1, (v, manifest.parent_version)
    finally:
        b.stop()
        thread.join(timeout=60)


def test_a_learner_with_nothing_to_merge_gives_the_lease_back(kafka, redis_server, unique):
    """Found by ``make scale``: the leader is killed; a restarted learner that owns no partition yet (no
    batch, no served version) takes the lease at its merge tick and keeps renewing it, while the learner
    that applied every batch can never lead: no version is published again. Expected: a learner with no
    model to merge from does not hold the lease (one that is bootstrapping does: it publishes under it)."""
    settings = service_settings(kafka.address, redis_server.address, unique, learner_id="idle", lease_ttl_seconds=2.0)
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    idle = Service(settings)
    thread = run_in_thread(idle)
    try:
        lease = Lease(idle.redis, idle.versions.keys, "probe")
        assert idle.leadership.claim() is not None   # it held the lease when its previous holder died
        assert lease.current().holder == idle.leadership.holder
        assert idle.merge_now() is None and idle.engine.architecture is None
        assert lease.current() is None, "an idle learner kept the lease"
        assert idle.metrics.leader._value.get() == 0
        assert idle.merge_now() is None and lease.current() is None   # its ticks leave it to one that can merge
    finally:
        idle.stop()
        thread.join(timeout=60)
