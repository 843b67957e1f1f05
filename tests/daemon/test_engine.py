"""The engine alone (no servers): bootstrap, drift decisions, merges through the gate, checkpoints."""

from __future__ import annotations

import pytest
import torch

from consumers.datasets import load_dataset
from consumers.scenarios import parse_phase, split_into_phases
from consumers.wire import Batch, BatchSource
from daemon.engine import Engine
from daemon.settings import load_settings


@pytest.fixture(scope="module")
def phases():
    ds = load_dataset("mnist5k")
    return split_into_phases(ds, [parse_phase("upright=identity"), parse_phase("rot90=rotate:90")],
                             samples_per_phase=1000)


def _batches(phase, x, y, size=100, offset=0):
    for i, start in enumerate(range(0, len(y), size)):
        yield Batch(x[start:start + size], y[start:start + size], phase.name, "image", f"{phase.name}-{i}",
                    BatchSource("t", 0, offset + i))


def _engine(**overrides):
    torch.manual_seed(0)
    return Engine(load_settings(bootstrap_batches=6, merge_after_child_updates=3, **overrides), torch.device("cpu"))


def _bootstrap(engine, batches):
    results = []
    for b in batches:
        results.append(engine.process(b))
        if results[-1].publish_bootstrap:
            engine.adopt_bootstrap(1)
    return results


@pytest.fixture(scope="module")
def served(phases):
    """An engine that has bootstrapped on the upright phase, as a checkpoint to copy from."""
    engine = _engine()
    (up, xu, yu), _ = phases
    results = _bootstrap(engine, _batches(up, xu, yu))
    return engine.checkpoint(), results


def _copy(served):
    engine = _engine()
    engine.restore(*served[0])
    return engine


def test_bootstrap_trains_until_the_served_model_is_good_enough(served):
    engine, results = _copy(served), served[1]
    actions = [r.action for r in results]
    assert actions[:6] == ["bootstrap"] * 6
    ends = [i for i, r in enumerate(results) if r.publish_bootstrap]
    assert len(ends) == 1 and ends[0] >= 5
    assert set(actions[ends[0] + 1:]) <= {"keep"}
    assert engine.served_version == 1
    assert min(engine.metrics().values()) >= 0.7


def test_drift_spawns_a_child_then_retrains_it(served, phases):
    engine = _copy(served)
    _, (rot, xr, yr) = phases
    results = [engine.process(b) for b in _batches(rot, xr, yr, offset=10)]
    first = results[0]
    assert first.action == "spawn" and first.drift and first.kl > 0.5 and first.accuracy < 0.7
    assert any(r.action == "retrain" and r.child == first.child for r in results[1:])
    assert engine.counters.drift_events >= 1
    assert any(r.merge_due for r in results)
    assert engine.applied_offsets == {"t:0": 20}


def test_merge_improves_the_drifted_slice_and_passes_the_gate(served, phases):
    engine = _copy(served)
    _, (rot, xr, yr) = phases
    for b in _batches(rot, xr, yr, offset=10):
        engine.process(b)
    outcome = engine.plan_merge()
    assert outcome.accepted, outcome.reason
    assert outcome.candidate_metrics["rot90"] > outcome.served_metrics["rot90"] + 0.2
    assert outcome.plan["mode"] == "auto" and outcome.plan["evaluations"] == len(outcome.plan["candidates"]) > 1
    assert outcome.plan["selection_rows"] > 0 and outcome.plan["gate_rows"] > 0
    engine.adopt_merge(outcome, 2)
    served = engine.root.model.state_dict()
    assert engine.served_version == 2 and all(torch.equal(served[k], v) for k, v in outcome.state.items())
    assert engine.plan_merge() is None   # nothing learned since: the same merge is not tried again


def test_replayed_batches_are_applied_once(phases):
    engine = _engine()
    (up, xu, yu), _ = phases
    batch = next(_batches(up, xu, yu))
    assert engine.process(batch).action == "bootstrap"
    assert engine.process(batch).action == "skip"            # same offset
    moved = Batch(batch.x, batch.y, batch.slice, "image", batch.batch_id, BatchSource("t", 0, 99))
    assert engine.process(moved).action == "skip"            # same batch id at another offset
    assert engine.counters.batches == 1 and engine.counters.duplicates_skipped == 2


def test_checkpoint_restores_the_same_engine(served, phases):
    engine = _copy(served)
    _, (rot, xr, yr) = phases
    rot_batches = list(_batches(rot, xr, yr, offset=10))
    for b in rot_batches[:3]:
        engine.process(b)
    meta, tensors = engine.checkpoint()
    twin = _engine()
    twin.restore(meta, tensors)
    assert twin.counters == engine.counters and twin.applied_offsets == engine.applied_offsets
    assert twin.metrics() == engine.metrics()
    a, b = engine.process(rot_batches[3]), twin.process(rot_batches[3])
    assert (a.action, a.child, round(a.kl, 6)) == (b.action, b.child, round(b.kl, 6))
