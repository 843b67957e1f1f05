"""A slice that moves to another learner takes its rows and its children with it (issue 13's rebalance
safety), through real Redis: learner ``a`` learned slice ``moved`` (a child spawned for it, published to
the zoo, its rows in a's contribution); learner ``b``, at the same served version, takes the slice over
before its first batch of it."""

from __future__ import annotations

import copy

import torch

from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from daemon.service.publisher import Publisher, child_job
from daemon.service.takeover import take_over_slice
from zoo_store.contributions import ContributionStore
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore
from zoo_store.zoo import ZooFollower, ZooStore

CENTRES = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3


def _batch(name: str, i: int, mirrored: bool = False, gen=torch.Generator().manual_seed(1)) -> Batch:
    """Rows of the four blobs; ``mirrored``: the blobs at minus their centres, a domain the served model
    cannot cope with (a shifted one it learned to, once its first model trained enough)."""
    y = torch.randint(4, (64,), generator=gen)
    x = (-1.0 if mirrored else 1.0) * CENTRES[y] + torch.randn(64, 8, generator=gen)
    return Batch(x, y, name, "tabular", f"{name}{i}", BatchSource("t", 0, i))


def _engine() -> Engine:
    torch.manual_seed(0)
    return Engine(ModelSettings(num_classes=4), LearnerSettings(bootstrap_batches=2, bootstrap_accuracy=0.5),
                  MergeSettings(), torch.device("cpu"))


def test_a_moved_slice_brings_its_rows_and_its_child(redis_client, unique):
    a = _engine()
    assert [a.process(_batch("base", i)) for i in range(2)][-1].publish_bootstrap
    a.adopt_bootstrap(1)
    at_v1 = copy.deepcopy(a.checkpoint())   # the live state goes on changing
    moved = [a.process(_batch("moved", i, mirrored=True)) for i in range(2, 6)]
    assert moved[0].action == "spawn", moved[0].reason
    child_id = moved[0].child

    keys = Keys(unique)
    zoo = ZooStore(VersionStore(redis_client, keys))
    publisher = Publisher(VersionStore(redis_client, keys), zoo=zoo).start()
    try:
        for release in a.children_to_publish():
            publisher.submit(child_job("main", release, lambda _p: None, "a")).result(timeout=30)
    finally:
        publisher.stop(drain_seconds=5)
    contribution = a.contribution("a")
    ContributionStore(redis_client, keys).write("a", contribution.version, contribution.samples,
                                                contribution.architecture, contribution.state,
                                                contribution.heldout, contribution.replay)

    b = _engine()
    b.restore(*at_v1)
    assert not b.knows_slice("moved")
    taken = take_over_slice(b, ContributionStore(redis_client, keys), ZooFollower(redis_client, unique), "main", "b",
                            "moved")
    assert len(taken) == 1
    node = b._state.tree.nodes[taken[0]]
    original = a._state.tree.nodes[child_id]
    assert node.status == "active" and node.slices == ["moved"] and node.fingerprint is not None
    assert all(torch.equal(node.model.state_dict()[k], v) for k, v in original.model.state_dict().items())
    assert b.knows_slice("moved")
    # the next batch of the slice retrains the child it took over: no second specialist is spawned
    result = b.process(_batch("moved", 6, mirrored=True))
    assert result.action == "retrain" and result.child == taken[0], result.reason
    assert b.counters.children_spawned == 0
    # taken once: the slice is known now, so a second call takes nothing
    assert take_over_slice(b, ContributionStore(redis_client, keys), ZooFollower(redis_client, unique), "main", "b",
                           "moved") == []


def test_a_copy_child_on_another_base_is_not_taken_over():
    a = _engine()
    [a.process(_batch("base", i)) for i in range(2)]
    a.adopt_bootstrap(1)
    a.process(_batch("moved", 2, mirrored=True))
    child = a._state.tree.active_children()[0]
    b = _engine()
    b.restore(*a.checkpoint())
    kwargs = dict(origin="main.a-c1 v1", architecture=child.architecture.model_dump(),
                  state=child.model.state_dict(), slices=["moved"], spawn_method="copy")
    assert b.take_over_child(base_version=7, **kwargs) is None   # its task vector is against other weights
    assert b.take_over_child(base_version=1, **kwargs) is not None
