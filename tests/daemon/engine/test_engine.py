"""The engine alone (no servers): bootstrap, drift decisions, merges through the gate, checkpoints."""

from __future__ import annotations

import pytest
import torch

from tools.datasets import load_dataset
from tools.scenarios import parse_phase, split_into_phases
from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from daemon.engine.stages import ENGINE_STAGES
from daemon.learn.training import accuracy, compute_dtype, embed, model_input


@pytest.fixture(scope="module")
def phases():
    ds = load_dataset("mnist5k")
    return split_into_phases(ds, [parse_phase("upright=identity"), parse_phase("rot90=rotate:90")],
                             samples_per_phase=1000)


def _batches(phase, x, y, size=100, offset=0):
    for i, start in enumerate(range(0, len(y), size)):
        yield Batch(x[start:start + size], y[start:start + size], phase.name, "image", f"{phase.name}-{i}",
                    BatchSource("t", 0, offset + i))


def _engine(model=None, merge=None, **learner):
    torch.manual_seed(0)
    return Engine(ModelSettings(**(model or {})), LearnerSettings(**{"bootstrap_batches": 6, **learner}),
                  MergeSettings(**{"after_child_updates": 3, **(merge or {})}), torch.device("cpu"))


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


def _copy(served, **overrides):
    engine = _engine(**overrides)
    engine.restore(*served[0])
    return engine


def test_bootstrap_trains_until_the_served_model_is_good_enough(served):
    """Bootstrap batches until the rows minimum (400: four batches of 100), then until the held-out
    accuracy reaches bootstrap_accuracy (not the cap); the first version is published once."""
    engine, results = _copy(served), served[1]
    actions = [r.action for r in results]
    ends = [i for i, r in enumerate(results) if r.publish_bootstrap]
    assert len(ends) == 1 and ends[0] >= 3
    assert actions[:ends[0] + 1] == ["bootstrap"] * (ends[0] + 1)
    assert ">= 0.8 after" in results[ends[0]].reason
    assert set(actions[ends[0] + 1:]) <= {"keep"}
    assert engine.served_version == 1
    assert min(engine.metrics().values()) >= 0.7


def test_drift_spawns_a_child_then_retrains_it(served, phases):
    engine = _copy(served, train_served=False)   # only children learn: the seed's table
    _, (rot, xr, yr) = phases
    results = [engine.process(b) for b in _batches(rot, xr, yr, offset=10)]
    first = results[0]
    assert first.action == "spawn" and first.drift and first.kl > 0.5 and first.accuracy < 0.7
    assert any(r.action == "retrain" and r.child == first.child for r in results[1:])
    assert engine.counters.drift_events >= 1
    assert any(r.merge_due for r in results)


def test_each_batch_reports_where_its_time_went(served, phases):
    engine = _copy(served)
    (up, xu, yu), (rot, xr, yr) = phases
    kept = engine.process(next(_batches(up, xu[-100:], yu[-100:], offset=20)))
    spawned = engine.process(next(_batches(rot, xr, yr, offset=21)))
    assert kept.action == "keep" and spawned.action == "spawn"
    assert {"snapshot", "split", "observe", "train_served", "buffers"} <= set(kept.stages)
    assert "route" not in kept.stages and "train_children" not in kept.stages  # a kept batch runs no child
    # the served fingerprint is in the published version's features: refit on adoption, not per batch
    assert "fingerprint" not in kept.stages
    assert {"route", "train_children", "fingerprint"} <= set(spawned.stages)  # the new child's own
    for r in (kept, spawned):
        assert set(r.stages) <= set(ENGINE_STAGES) and all(v >= 0 for v in r.stages.values())
        assert sum(r.stages.values()) <= r.seconds  # stages never nest: their sum is within the batch
        assert "stages" not in r.record()


def test_served_model_learns_every_batch_and_publishes_through_the_gate(served, phases):
    """train_served: the drifted slice is spawned once, then the served model copes with it itself;
    followers get that progress only through a merge that passes the gate."""
    engine = _copy(served)
    _, (rot, xr, yr) = phases
    before = engine.counters.served_updates
    results = [engine.process(b) for b in _batches(rot, xr, yr, offset=10)]
    assert results[0].action == "spawn" and results[0].drift
    assert results[-1].action == "keep" and results[-1].accuracy >= 0.7   # learned, before any merge
    assert engine.counters.served_updates == before + len(results) and engine.served_version == 1
    assert engine.metrics()["rot90"] < 0.5          # the published version has not changed yet
    outcome = engine.merge()
    assert outcome.accepted, outcome.reason
    assert outcome.candidate_metrics["rot90"] > outcome.served_metrics["rot90"] + 0.3
    engine.adopt_merge(outcome, 2)
    assert engine.served_version == 2 and engine.metrics()["rot90"] > 0.7
    assert engine.merge() is None   # nothing learned since


def test_a_learner_adopting_a_merge_of_its_contribution_carries_only_what_came_after(served, phases):
    """Several learners: the leader merges what a learner offered (its plan names the offer's sample
    count); the learner then serves the new version plus what it learned since that offer, not the
    offer again. Without the leader's naming it, everything since the last version is carried."""
    _, (rot, xr, yr) = phases
    batches = list(_batches(rot, xr, yr, offset=10))

    def learner_after(offer_batches, later_batches, merged: bool):
        engine = _copy(served)
        for b in offer_batches:
            engine.process(b)
        offered = engine.contribution("l1")
        for b in later_batches:
            engine.process(b)
        learned = engine.contribution("l1").state
        leaders = {k: v + 0.01 if v.is_floating_point() else v for k, v in offered.state.items()}
        assert engine.adopt_external(version=2, parent_version=1, architecture=offered.architecture, state=leaders,
                                     base_version=1, metrics={}, carry_progress=True,
                                     merged_samples=offered.samples if merged else None)
        return engine.contribution("l1").state, leaders, offered.state, learned

    now, leaders, _, _ = learner_after(batches[:3], [], merged=True)
    assert all(torch.equal(now[k], leaders[k]) for k in now)   # nothing since the offer: the merge alone
    now, leaders, offered, learned = learner_after(batches[:3], batches[3:4], merged=True)
    assert all(torch.allclose(now[k], leaders[k] + learned[k] - offered[k], atol=1e-6) for k in now)
    now, leaders, _, learned = learner_after(batches[:3], [], merged=False)
    v1 = _copy(served).served_state()
    assert all(torch.allclose(now[k], leaders[k] + learned[k] - v1[k], atol=1e-6) for k in now)
    assert not all(torch.equal(now[k], leaders[k]) for k in now)


def test_a_learner_rehearses_the_slices_other_learners_hold(served, phases):
    """Several learners: the replay rows other learners contribute are rehearsed with this learner's
    own (a slice it holds stays its own to replay), so its served model keeps what the group learned."""
    (up, xu, yu), (rot, xr, yr) = phases
    rot_test = model_input(xr[800:], "image"), yr[800:]

    def rot90_accuracy(rehearse: bool) -> float:
        engine = _copy(served)
        if rehearse:
            engine.rehearse_others({"rot90": (xr[:800], yr[:800]), "upright": (xr[:50], yr[:50])})
            assert set(engine._state.buffers.others) == {"rot90"}
        for b in _batches(up, xu[:500], yu[:500], offset=20):
            engine.process(b)
        model = engine.architecture.build()
        model.load_state_dict(engine.working_state())
        return accuracy(model, *rot_test)

    alone, rehearsing = rot90_accuracy(False), rot90_accuracy(True)
    assert rehearsing > alone + 0.2, (alone, rehearsing)


def test_drift_is_measured_in_the_published_versions_features(served, phases):
    """The served reference's fingerprint is fit in the published version's features: the learning
    model's updates leave it alone (no refit per batch), and a new slice stays drift until a version
    that learned it is adopted, whose refit takes its rows in."""
    engine = _copy(served)
    state = engine._state
    (up, xu, yu), (rot, xr, yr) = phases
    fingerprint = state.root.fingerprint
    batch = next(_batches(up, xu[-100:], yu[-100:], offset=20))
    kept = engine.process(batch)
    assert kept.action == "keep" and state.root.fingerprint is fingerprint
    assert kept.kl == pytest.approx(fingerprint.score(embed(state.published_model(), model_input(batch.x, "image"))))
    rotated = [engine.process(b) for b in _batches(rot, xr, yr, offset=21)]
    assert rotated[-1].action == "keep" and rotated[-1].drift   # learned, but not by what is served
    assert state.root.fingerprint is fingerprint
    outcome = engine.merge()
    assert outcome.accepted, outcome.reason
    engine.adopt_merge(outcome, 2)
    assert state.root.fingerprint is not fingerprint
    assert all(torch.equal(state.published_model().state_dict()[k], v) for k, v in outcome.state.items())
    after = engine.process(next(_batches(rot, xr[-100:], yr[-100:], offset=40)))
    assert not after.drift and after.kl < rotated[-1].kl


def test_merge_improves_the_drifted_slice_and_passes_the_gate(served, phases):
    engine = _copy(served, train_served=False)
    _, (rot, xr, yr) = phases
    for b in _batches(rot, xr, yr, offset=10):
        engine.process(b)
    outcome = engine.merge()
    assert outcome.accepted, outcome.reason
    assert outcome.candidate_metrics["rot90"] > outcome.served_metrics["rot90"] + 0.2
    assert outcome.plan["mode"] == "auto" and outcome.plan["evaluations"] == len(outcome.plan["candidates"]) > 1
    assert outcome.plan["selection_rows"] > 0 and outcome.plan["gate_rows"] > 0
    engine.adopt_merge(outcome, 2)
    served = engine.served_state()
    assert engine.served_version == 2 and all(torch.equal(served[k], v) for k, v in outcome.state.items())
    assert engine.merge() is None   # nothing learned since: the same merge is not tried again


def test_checkpoint_restores_the_same_engine(served, phases):
    engine = _copy(served)
    _, (rot, xr, yr) = phases
    rot_batches = list(_batches(rot, xr, yr, offset=10))
    for b in rot_batches[:3]:
        engine.process(b)
    meta, tensors = engine.checkpoint()
    from safetensors.torch import save

    save(tensors)  # what zoo_store.checkpoints stores: no tensor may share memory with another
    twin = _engine()
    twin.restore(meta, tensors)
    assert twin.counters == engine.counters and twin.served_version == engine.served_version
    assert twin.metrics() == engine.metrics()
    a, b = engine.process(rot_batches[3]), twin.process(rot_batches[3])
    assert (a.action, a.child, round(a.kl, 6)) == (b.action, b.child, round(b.kl, 6))


def _tabular_batches(name, x, y, size=128, offset=0):
    for i, start in enumerate(range(0, len(y) - size + 1, size)):
        yield Batch(x[start:start + size], y[start:start + size], name, "tabular", f"{name}-{i}",
                    BatchSource("tab", 0, offset + i))


def test_compact_children_inherit_publish_on_their_own_line_and_merge_by_distillation():
    from sklearn.datasets import load_digits

    from daemon.learn.models import parameter_count

    digits = load_digits()
    x, y = torch.from_numpy(digits.data).float() / 16.0, torch.from_numpy(digits.target).long()
    permuted = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    engine = _engine(model={"family": "tabular_mlp"}, child_size_ratio=0.5, bootstrap_batches=4, bootstrap_accuracy=0.85,
                     train_served=False)   # the compact child line alone: only children learn
    _bootstrap(engine, _tabular_batches("plain", x[:512], y[:512]))
    assert engine.served_version == 1 and engine.counters.children_spawned == 0
    results = [engine.process(b) for b in _tabular_batches("perm", permuted[512:], y[512:], offset=100)]
    spawned = [r for r in results if r.action == "spawn"]
    assert spawned, [r.action for r in results]
    # the child that learned most of the slice (a compact child from a trained parent needs several updates)
    child = max((engine._state.tree.nodes[r.child] for r in spawned), key=lambda node: node.updates)
    assert parameter_count(child.model) < parameter_count(engine._state.root.model) / 2
    assert child.architecture != engine.architecture

    releases = {r.node_id: r for r in engine.children_to_publish()}
    assert set(releases) == {r.child for r in spawned}   # every child that learned, once
    first = releases[child.node_id]
    assert first.slices == ["perm"] and set(first.fingerprints) == {"perm"}   # a zoo member with its fingerprint
    served_perm = engine.metrics()["perm"]
    assert first.metrics["perm"] > served_perm + 0.1   # the compact child learned the new slice
    assert first.lineage[-1]["node_id"] == child.node_id and first.parent_version == 1
    for release in releases.values():
        engine.child_published(release)
    assert engine.children_to_publish() == []

    outcome = engine.merge()
    assert child.node_id in outcome.plan["distill"]["children"]
    assert outcome.candidate_metrics["perm"] > outcome.served_metrics["perm"]   # served learned from the child


def test_gate_rejects_a_merge_with_a_child_trained_on_shuffled_labels(served, phases):
    from daemon.learn.training import fit, model_input

    engine = _engine(merge={"method": "average", "level": "model", "consolidate_epochs": 0},  # the gate is under test
                     train_served=False)
    engine.restore(*served[0])
    (up, xu, yu), (rot, xr, yr) = phases
    first = engine.process(next(_batches(rot, xr, yr, offset=10)))
    assert first.action == "spawn"
    bad = engine._state.tree.nodes[first.child]
    shuffled = yu[torch.randperm(len(yu), generator=torch.Generator().manual_seed(1))]
    fit(bad.model, model_input(xu, "image"), shuffled, epochs=3, lr=1e-3,   # the planted bad child
                 generator=torch.Generator().manual_seed(2))
    bad.updates += 1
    outcome = engine.merge()
    assert not outcome.accepted
    failing = {r.slice for r in outcome.verdict.regressions}
    assert failing and all(name in outcome.reason for name in failing)
    record = outcome.record()
    assert record["regressions"] and all(r["candidate"] < r["served"] - 0.02 for r in record["regressions"])
    assert engine.counters.merges_rejected == 1 and engine.counters.merges_accepted == 0
    assert engine.served_version == 1


def test_same_seed_same_engine_and_another_seed_another(phases):
    (up, xu, yu), (rot, xr, yr) = phases
    stream = list(_batches(up, xu[:600], yu[:600])) + list(_batches(rot, xr[:300], yr[:300], offset=10))

    def run(seed):
        torch.manual_seed(1234 + seed)  # the global RNG must not matter: the engine seeds what it builds
        engine = Engine(ModelSettings(), LearnerSettings(seed=seed, bootstrap_batches=3, bootstrap_accuracy=0.5),
                        MergeSettings(), torch.device("cpu"))
        results = []
        for b in stream:
            results.append(engine.process(b).record())
            if results[-1]["publish_bootstrap"]:
                engine.adopt_bootstrap(1)
        return results, engine.working_state()

    (a, wa), (b, wb), (c, wc) = run(3), run(3), run(4)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_bootstrap_ends_when_another_slice_arrives(phases):
    (up, xu, yu), (rot, xr, yr) = phases
    engine = _engine(bootstrap_batches=8)
    first = [engine.process(b) for b in list(_batches(up, xu[:300], yu[:300]))]
    assert [r.action for r in first] == ["bootstrap"] * 3 and not any(r.publish_bootstrap for r in first)
    assert "waiting" not in first[-1].reason and "3/8" in first[-1].reason
    nxt = engine.process(next(_batches(rot, xr, yr, offset=10)))
    assert nxt.publish_bootstrap and nxt.action == "spawn" and nxt.drift   # judged, not absorbed


def test_bootstrap_counts_rows_as_well_as_batches(phases):
    """Large batches: the first version is served once it has bootstrap_rows rows, before
    bootstrap_batches batches."""
    (up, xu, yu), _ = phases
    engine = _engine(bootstrap_batches=8, bootstrap_rows=500, bootstrap_accuracy=0.01)
    results = [engine.process(b) for b in _batches(up, xu[:600], yu[:600], size=200)]
    assert [r.publish_bootstrap for r in results] == [False, False, True]
    assert "1/8 batches, 200/500 rows" in results[0].reason
    capped = _engine(bootstrap_batches=8, bootstrap_rows=200, bootstrap_accuracy=1.0)  # never good enough
    results = [capped.process(b) for b in _batches(up, xu[:500], yu[:500], size=100)]
    assert [r.publish_bootstrap for r in results] == [False, False, False, True, False]
    assert "400 rows (the cap)" in results[3].reason and "served at 16 batches or 400 rows" in results[2].reason


def test_a_pause_finishes_a_bootstrap_only_once_it_is_good_enough(phases):
    (up, xu, yu), _ = phases
    never = _engine(bootstrap_batches=8, bootstrap_accuracy=1.0)
    assert not never.finish_bootstrap_idle(2.0)                   # no batch yet: nothing to serve
    never.process(next(_batches(up, xu, yu)))
    assert not never.finish_bootstrap_idle(2.0)                   # not good enough: waits for batches
    engine = _engine(bootstrap_batches=8, bootstrap_accuracy=0.01)
    engine.process(next(_batches(up, xu, yu)))
    assert engine.finish_bootstrap_idle(2.0)
    assert not engine.finish_bootstrap_idle(2.0)                  # finished once
    nxt = engine.process(list(_batches(up, xu, yu))[1])
    assert nxt.action != "bootstrap" and not nxt.publish_bootstrap   # the next batch is judged, not bootstrapped


def test_a_pause_trains_a_first_model_a_burst_left_weak(phases):
    """One batch leaves the first model under bootstrap_accuracy. The pause trains it on its rows as a
    merge consolidates, and it is served once good enough on held-out rows that chose no epoch; without
    that training (consolidation off) it waits for more batches."""
    (up, xu, yu), _ = phases
    burst = list(_batches(up, xu, yu))[:1]
    untrained = _engine(bootstrap_batches=8, bootstrap_accuracy=0.75, merge={"consolidate_epochs": 0})
    trained = _engine(bootstrap_batches=8, bootstrap_accuracy=0.75)
    for engine in (untrained, trained):
        for b in burst:
            assert not engine.process(b).publish_bootstrap
    before = trained._learner._heldout_accuracy(trained._state)["upright"]
    assert before < 0.75
    assert not untrained.finish_bootstrap_idle(2.0)
    assert trained.finish_bootstrap_idle(2.0)
    assert trained._learner._heldout_accuracy(trained._state)["upright"] > before + 0.1


def test_a_small_batch_never_spawns(phases):
    (up, xu, yu), (rot, xr, yr) = phases
    engine = _engine(bootstrap_batches=2, bootstrap_accuracy=0.01, min_spawn_rows=32)
    assert [r.publish_bootstrap for r in map(engine.process, list(_batches(up, xu[:200], yu[:200])))] == [False, True]
    engine.adopt_bootstrap(1)
    small = engine.process(Batch(xr[:16], yr[:16], "rot90", "image", "r-0", BatchSource("t", 0, 50)))
    assert small.drift and small.action == "keep" and "min_spawn_rows" in small.reason
    assert engine.counters.children_spawned == 0


def test_releases_carry_continual_metrics_and_the_learned_record_survives_a_checkpoint():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 3

    def batch(name, classes, i):
        y = torch.tensor(classes)[torch.randint(len(classes), (64,), generator=gen)]
        return Batch(centres[y] + torch.randn(64, 8, generator=gen), y, name, "tabular", f"{name}{i}",
                     BatchSource("t", 0, i))

    engine = _engine(model={"num_classes": 4}, bootstrap_batches=2)
    for i in range(2):
        result = engine.process(batch("a", [0, 1], i))
    assert result.publish_bootstrap
    first = engine.release_bootstrap()
    assert first.continual.learned == ["a"] and first.continual.forgetting == {}
    engine.adopt_bootstrap(1)
    engine.record_served(first)
    for i in range(2, 6):
        engine.process(batch("b", [2, 3], i))
    second = engine.release_merge(engine.merge())
    assert second.continual.learned == ["b"]      # a had no batch since v1 learned it
    assert second.continual.forgetting == {"a": round(first.metrics["a"] - second.metrics["a"], 4)}

    restored = _engine(model={"num_classes": 4}, bootstrap_batches=2)
    restored.restore(*engine.checkpoint())
    again = restored.release_merge(restored.merge())
    assert again.continual.learned == ["b"] and set(again.continual.forgetting) == {"a"}


def test_label_smoothing_reaches_every_cross_entropy_fit_of_the_learner():
    """The served model, a spawned child and the merge's consolidation all train towards the smoothed
    targets: with label_smoothing 0.6 over 10 classes no model can be trained past 0.46 confidence."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.from_numpy(digits.data).float() / 16.0, torch.from_numpy(digits.target).long()
    permuted = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(3))]

    def confidence(state):
        model = engine.architecture.build()
        model.load_state_dict(state)
        return model(x).softmax(1).max(1).values.mean().item()

    seen = {}
    for smoothing in (0.0, 0.6):
        engine = _engine(model={"family": "tabular_mlp"}, bootstrap_batches=4, bootstrap_accuracy=0.5,
                         label_smoothing=smoothing, accuracy_threshold=0.99)
        _bootstrap(engine, _tabular_batches("plain", x[:900], y[:900]))
        results = [engine.process(b) for b in _tabular_batches("perm", permuted[900:1500], y[900:1500], offset=100)]
        spawned = [r.child for r in results if r.action == "spawn"]
        assert spawned, [r.action for r in results]
        outcome = engine.merge()
        seen[smoothing] = {"served": confidence(engine.working_state()),
                           "child": confidence(engine._state.tree.nodes[spawned[0]].model.state_dict()),
                           "consolidated": confidence(outcome.state)}
    assert all(c < 0.46 for c in seen[0.6].values()), seen
    assert all(seen[0.0][k] > seen[0.6][k] + 0.15 for k in seen[0.0]), seen  # plain CE is not bounded so


def test_congruence_reaches_the_merges_consolidation_and_keeps_more_of_the_published_answers():
    """merge_consolidate_congruence trains the consolidation with the published version as a teacher on
    the rows it gets right: the merge records the weight, and the candidate loses fewer of the rows the
    published version classified right than the same merge without it (seeded: the same candidate else;
    8 epochs either way, patience off, so that the stop does not differ: on this stream the selection
    loss runs the plain consolidation to its bound, which keeps the old answers too)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.from_numpy(digits.data).float() / 16.0, torch.from_numpy(digits.target).long()
    permuted = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    lost, plans = {}, {}
    for weight in (0.0, 1.0):
        engine = _engine(model={"family": "tabular_mlp"}, bootstrap_batches=4, bootstrap_accuracy=0.5,
                         accuracy_threshold=0.99, merge={"consolidate_congruence": weight, "consolidate_patience": 0,
                                                         "consolidate_epochs": 8})
        _bootstrap(engine, _tabular_batches("plain", x[:900], y[:900]))
        for b in _tabular_batches("perm", permuted[900:1500], y[900:1500], offset=100):
            engine.process(b)
        outcome = engine.merge()
        plans[weight] = outcome.plan["consolidate"]["congruence"]
        published, candidate = engine.architecture.build(), engine.architecture.build()
        published.load_state_dict(engine.served_state())
        candidate.load_state_dict(outcome.state)
        old_right = published(x[:900]).argmax(1) == y[:900]
        lost[weight] = int((old_right & (candidate(x[:900]).argmax(1) != y[:900])).sum())
    assert plans == {0.0: 0.0, 1.0: 1.0}
    assert lost[1.0] < lost[0.0], lost


def test_a_learner_that_does_not_lead_consolidates_its_served_model_and_publishes_nothing(served, phases):
    """At its merge tick a learner whose merges another learner leads rehearses every slice as a merge
    would (consolidation on slice-balanced replay) and builds on the result; no version, no merge counted."""
    engine = _copy(served, merge={"consolidate_patience": 0, "consolidate_epochs": 3})
    up_rows = engine._state.buffers.heldout_sets()["upright"]
    _, (rot, xr, yr) = phases
    for b in _batches(rot, xr[:600], yr[:600], offset=10):
        engine.process(b)
    before = engine.metrics(engine.working_state())
    counters = (engine.counters.merges_accepted, engine.counters.merges_rejected, engine.served_version)
    assert engine.consolidate_working()
    after = engine.metrics(engine.working_state())
    assert (engine.counters.merges_accepted, engine.counters.merges_rejected, engine.served_version) == counters
    assert sum(after.values()) > sum(before.values()) + 0.02, (before, after)   # every slice rehearsed
    assert len(up_rows[1]) and after["upright"] >= before["upright"] - 0.02, (before, after)
    assert not engine.consolidate_working()   # nothing learned since: nothing to consolidate


def test_a_candidate_short_of_significance_is_confirmed_on_the_next_batch_and_published(served, phases):
    """merge.confirm_alpha: a merge rejected only because its gain is not yet significant (here: at an alpha of
    1e-12) is held; the next batch's rows, before they train, confirm it; the merge then publishes it as it
    was, and what the served model learned meanwhile stays."""
    engine = _copy(served, merge={"alpha": 1e-12, "confirm_alpha": 0.05})
    _, (rot, xr, yr) = phases
    batches = list(_batches(rot, xr, yr, offset=10))
    for b in batches[:3]:
        engine.process(b)
    rejected = engine.merge()
    assert not rejected.accepted and rejected.reason.startswith("gain not significant"), rejected.reason
    assert rejected.held and rejected.record()["held"]   # the record says it waits for fresh rows
    assert not engine.candidate_confirmed()
    result = engine.process(batches[3])
    assert result.merge_due and engine.candidate_confirmed()
    working = engine.working_state()
    outcome = engine.merge()
    assert outcome.accepted and outcome.reason.startswith("confirmed on 100 fresh rows at look 1"), outcome.reason
    assert outcome.confirmed and not rejected.confirmed and not outcome.held
    assert outcome.plan["confirmation"]["rejected_as"] == rejected.reason
    assert outcome.verdict.p_value <= 0.025 and outcome.verdict.rows == rejected.verdict.rows + 100
    assert all(torch.equal(outcome.state[k], v) for k, v in rejected.state.items())   # the held candidate itself
    engine.adopt_merge(outcome, 2)
    assert engine.served_version == 2 and engine.metrics()["rot90"] > 0.5
    now = engine.working_state()  # the candidate plus what was learned since it: float rounding apart, unchanged
    assert all(torch.allclose(now[k], v, atol=1e-6) for k, v in working.items() if v.is_floating_point())
    assert not engine.candidate_confirmed()


def test_a_held_candidate_is_dropped_once_another_version_is_served(served, phases):
    engine = _copy(served, merge={"alpha": 1e-12, "confirm_alpha": 0.05})
    _, (rot, xr, yr) = phases
    batches = list(_batches(rot, xr, yr, offset=10))
    for b in batches[:3]:
        engine.process(b)
    assert not engine.merge().accepted
    assert engine.adopt_external(version=2, parent_version=1, architecture=engine.architecture.model_dump(),
                                 state=engine.served_state(), base_version=None, metrics={}, carry_progress=True)
    assert not engine.process(batches[3]).merge_due and not engine.candidate_confirmed()


def test_a_merge_of_other_learners_contributions_is_not_held_for_confirmation(served, phases):
    """They carry their progress from the contribution the published merge names and keep only their last
    few: a candidate published batches later could name one they no longer hold."""
    _, (rot, xr, yr) = phases
    batches = list(_batches(rot, xr, yr, offset=10))
    other = _copy(served)
    for b in batches[3:5]:
        other.process(b)
    leader = _copy(served, merge={"alpha": 1e-12, "confirm_alpha": 0.05})
    for b in batches[:3]:
        leader.process(b)
    rejected = leader.merge([other.contribution("l1")])
    assert not rejected.accepted and rejected.reason.startswith("gain not significant"), rejected.reason
    assert "learner:l1" in rejected.children and not rejected.held
    assert not leader.process(batches[5]).merge_due and not leader.candidate_confirmed()


def test_precision_bfloat16_trains_in_bf16_reproducibly_and_keeps_float32_weights(phases):
    (up, xu, yu), _ = phases
    states = []
    try:
        for _ in range(2):
            engine = _engine(model={"precision": "bfloat16"})
            assert compute_dtype(torch.device("cpu")) == torch.bfloat16   # the engine set the process's precision
            _bootstrap(engine, _batches(up, xu[:600], yu[:600]))
            states.append(engine.served_state())
        assert all(t.dtype == torch.float32 for t in states[0].values() if t.is_floating_point())
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])   # same seed, same stream: same bits
    finally:
        _engine()   # default settings: the process back to "auto"
    assert compute_dtype(torch.device("cpu")) == torch.float32


def test_the_observations_passes_side_by_side_give_what_one_after_the_other_gives(served, phases):
    """With a core free (one torch thread on two cores) the published version's forward pass runs beside
    the learning model's and the held candidate's (daemon.engine.overlap): every figure and every weight
    is what the same batches give with the passes one after the other."""
    from daemon.engine.overlap import usable_cores

    if usable_cores() < 2:
        pytest.skip("overlap needs a core torch does not use")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for side_by_side in (True, False):
            engine = _copy(served, merge={"alpha": 1e-12, "confirm_alpha": 0.05})
            overlap = engine._learner.overlap
            if not side_by_side:
                overlap.available = lambda: False
            assert overlap.available() is side_by_side
            _, (rot, xr, yr) = phases
            batches = list(_batches(rot, xr, yr, offset=10))
            results = [engine.process(b) for b in batches[:3]]
            assert engine.merge().held   # a candidate waits: the next batch runs three passes
            results += [engine.process(b) for b in batches[3:6]]
            assert engine.candidate_confirmed()
            runs.append(([(r.action, r.kl, r.accuracy, r.drift, r.child) for r in results], engine.working_state()))
            assert (overlap._pool is not None) is side_by_side
        (figures, state), (figures_in_order, state_in_order) = runs
        assert figures == figures_in_order
        assert all(torch.equal(state[k], state_in_order[k]) for k in state)
    finally:
        torch.set_num_threads(threads)
