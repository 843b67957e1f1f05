"""The decision table of daemon/learn/policy.py, row by row, and the spawn-method table."""

import pytest

from daemon.learn.policy import Observation, Thresholds, decide

TH = Thresholds(kl=0.5, accuracy=0.7)


@pytest.mark.parametrize("obs, action, child, drift", [
    (Observation(accuracy=0.9, kl=0.1), "keep", None, False),
    (Observation(accuracy=0.9, kl=3.0), "keep", None, True),                      # drift, but copes
    (Observation(accuracy=0.7, kl=0.1), "keep", None, False),                     # threshold is inclusive
    (Observation(accuracy=0.5, kl=0.2), "spawn", None, False),                    # seed rule: low KL, low acc
    (Observation(accuracy=0.5, kl=4.0), "spawn", None, True),                     # no child yet
    (Observation(accuracy=0.5, kl=4.0, nearest_child="c1", nearest_kl=0.3), "retrain", "c1", True),
    (Observation(accuracy=0.5, kl=4.0, nearest_child="c1", nearest_kl=0.5), "spawn", None, True),  # KL not < thr
    (Observation(accuracy=0.1, kl=0.2, nearest_child="c2", nearest_kl=2.0), "spawn", None, False),
])
def test_decision_table(obs, action, child, drift):
    verdict = decide(obs, TH)
    assert (verdict.action, verdict.child, verdict.drift) == (action, child, drift)
    assert verdict.reason  # every decision says why


@pytest.mark.parametrize("child_accuracy, served_learns, action", [
    (0.6, False, "retrain"),   # the child does better than the served model (0.5): its data, its labels
    (0.5, True, "retrain"),    # as well: still its data
    (0.2, False, "spawn"),     # near in features, worse on the labels: a concept shift
    (0.2, True, "keep"),       # ... but the served model learns every batch and is ahead
])
def test_label_aware_routing(child_accuracy, served_learns, action):
    obs = Observation(accuracy=0.5, kl=4.0, nearest_child="c1", nearest_kl=0.1, nearest_accuracy=child_accuracy)
    verdict = decide(obs, TH, served_learns=served_learns)
    assert verdict.action == action and verdict.drift
    if child_accuracy < 0.5:
        assert "c1" in verdict.reason and f"{child_accuracy:.3f}" in verdict.reason


def test_spawn_method_table():
    from daemon.learn.policy import spawn_method

    assert spawn_method("auto", compact=True) == "hkt"
    assert spawn_method("auto", compact=False) == "copy"        # merges in weight space
    assert spawn_method("scratch", compact=False) == "scratch"
    assert spawn_method("hkt", compact=False) == "hkt"
    with pytest.raises(ValueError, match="copy"):
        spawn_method("copy", compact=True)


def test_concept_drift_is_flagged_when_accuracy_falls_where_kl_sees_nothing():
    # two labels of five swapped: same inputs (KL low), accuracy 0.98 -> 0.60 on 50 rows
    v = decide(Observation(accuracy=0.60, kl=0.1, expected_accuracy=0.98, rows=50), TH)
    assert v.drift and "concept drift" in v.reason and v.action == "spawn"
    # the same batch accuracy is no alarm when the model never did better, nor on noise-level drops
    assert not decide(Observation(accuracy=0.60, kl=0.1, expected_accuracy=0.62, rows=50), TH).drift
    assert not decide(Observation(accuracy=0.88, kl=0.1, expected_accuracy=0.92, rows=50), TH).drift
    assert not decide(Observation(accuracy=0.60, kl=0.1, expected_accuracy=None, rows=50), TH).drift
    # it coping still keeps the model, with the drift counted
    kept = decide(Observation(accuracy=0.75, kl=0.1, expected_accuracy=0.99, rows=200), TH)
    assert kept.action == "keep" and kept.drift


def test_concept_drift_false_alarms_are_rare_on_a_stationary_stream():
    import torch

    from daemon.learn.drift import concept_drift

    gen = torch.Generator().manual_seed(0)
    for expected in (0.9, 0.98):
        batches = torch.bernoulli(torch.full((20_000, 50), expected), generator=gen).mean(1)
        alarms = sum(concept_drift(float(a), 50, expected, alpha=1e-5) for a in batches)
        assert alarms <= 2, (expected, alarms)   # 0.2 expected at alpha 1e-5
    assert concept_drift(0.60, 50, 0.98, alpha=1e-5)


def test_a_weak_batch_without_drift_is_the_served_models_to_learn_not_a_new_childs():
    obs = Observation(accuracy=0.65, kl=0.2, expected_accuracy=0.8, rows=50)   # a 2-sd dip, no drift
    assert decide(obs, TH, served_learns=True).action == "keep"
    assert decide(obs, TH, served_learns=False).action == "spawn"   # the seed's rule when only children learn
    drifted = Observation(accuracy=0.65, kl=0.9, expected_accuracy=0.8, rows=50)
    assert decide(drifted, TH, served_learns=True).action == "spawn"
