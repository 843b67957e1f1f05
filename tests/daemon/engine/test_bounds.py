"""Long-run state stays bounded and settings stay in charge: max_children at spawn, max_slices at
admission, and the KL threshold after a restore."""

from __future__ import annotations

import pytest
import torch

from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from tools.datasets import load_dataset
from tools.scenarios import parse_phase, split_into_phases


@pytest.fixture(scope="module")
def phases():
    ds = load_dataset("mnist5k")
    return split_into_phases(ds, [parse_phase("upright=identity"), parse_phase("rot90=rotate:90")],
                             samples_per_phase=1000)


def _batch(x, y, slice_name, i):
    return Batch(x, y, slice_name, "image", f"{slice_name}-{i}", BatchSource("t", 0, i))


def _engine(**learner):
    return Engine(ModelSettings(), LearnerSettings(**{"bootstrap_batches": 4, "bootstrap_accuracy": 0.5, **learner}),
                  MergeSettings(after_child_updates=1000), torch.device("cpu"))


@pytest.fixture(scope="module")
def served(phases):
    """A checkpoint of an engine that has bootstrapped on the upright phase (served v1)."""
    engine = _engine()
    (up, xu, yu), _ = phases
    for i, start in enumerate(range(0, len(yu), 100)):
        if engine.process(_batch(xu[start:start + 100], yu[start:start + 100], up.name, i)).publish_bootstrap:
            engine.adopt_bootstrap(1)
            break
    assert engine.served_version == 1
    return engine.checkpoint()


def _restored(checkpoint, **learner):
    engine = _engine(**learner)
    engine.restore(*checkpoint)
    return engine


def test_a_stream_that_keeps_spawning_never_holds_more_than_max_children(served, phases):
    # every batch drifts (tiny KL threshold) and the served model never learns, so every batch
    # asks for a new child; no merge is ever accepted
    engine = _restored(served, max_children=2, kl_threshold=1e-9, train_served=False)
    _, (rot, xr, yr) = phases
    results = []
    for i, start in enumerate(range(0, 500, 50)):
        results.append(engine.process(_batch(xr[start:start + 50], yr[start:start + 50], rot.name, 100 + i)))
        assert engine.status().children.get("active", 0) <= 2
    assert [r.action for r in results[:2]] == ["spawn", "spawn"]
    capped = results[2:]
    assert capped and all(r.action == "retrain" and "max_children" in r.reason for r in capped)
    assert {r.child for r in capped} <= {results[0].child, results[1].child}
    assert engine.counters.children_spawned == 2


def test_a_new_slice_beyond_max_slices_evicts_the_least_recently_seen(served, phases):
    engine = _restored(served, max_slices=3, train_served=False)  # small batches: evaluated, nothing trained
    _, (_, xr, yr) = phases
    evicted = {}
    for i, name in enumerate(["s1", "s2", "s3", "s1", "s4"]):
        result = engine.process(_batch(xr[20 * i:20 * i + 20], yr[20 * i:20 * i + 20], name, 200 + i))
        evicted[name] = result.evicted_slice
    assert evicted == {"s1": None, "s2": None, "s3": "upright", "s4": "s2"}
    assert set(engine.metrics()) == {"s1", "s3", "s4"}
    assert set(engine.prequential_accuracy()) <= {"s1", "s3", "s4"}
    meta, tensors = engine.checkpoint()
    assert set(meta["buffers"]["replay"]) == {"s1", "s3", "s4"}
    assert not any(".upright." in k or ".s2." in k for k in tensors)
    assert set(meta["slice_last_batch"]) == {"s1", "s3", "s4"}


def test_the_kl_threshold_setting_wins_over_the_checkpoint_unless_calibrated_under_it(served):
    assert served[0]["kl_threshold"] == 0.5
    changed = _restored(served, kl_threshold=0.9)
    assert changed.checkpoint()[0]["kl_threshold"] == 0.9

    calibrated = _restored(served, kl_false_alarm_rate=0.01)  # a new rate: calibrated on the restored model
    meta = calibrated.checkpoint()[0]
    assert meta["kl_calibrated_rate"] == 0.01 and meta["kl_threshold"] not in (0.5, 0.9)

    same_rate = _restored(calibrated.checkpoint(), kl_false_alarm_rate=0.01, kl_threshold=7.0)
    assert same_rate.checkpoint()[0]["kl_threshold"] == meta["kl_threshold"]

    rate_dropped = _restored(calibrated.checkpoint(), kl_threshold=0.9)
    assert rate_dropped.checkpoint()[0]["kl_threshold"] == 0.9
    assert rate_dropped.checkpoint()[0]["kl_calibrated_rate"] is None
