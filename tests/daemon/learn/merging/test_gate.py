"""The publish gate: per-slice verdicts, and a bad child's merge rejected at the pure level."""

import torch

from tools.datasets import load_dataset
from daemon.learn.merging.gate import gate
from daemon.learn.merging.plans import MergePlan, UnitPlan, apply_plan
from daemon.learn.models import TabularMLP
from daemon.learn.training import accuracy, fit, model_input

AVERAGE = MergePlan("model", {"model": UnitPlan("average")})


def test_accepts_within_tolerance_and_new_slices():
    verdict = gate({"a": 0.90, "b": 0.50}, {"a": 0.885, "b": 0.80, "new": 0.1}, tolerance=0.02)
    assert verdict.accepted and verdict.regressions == ()


def test_rejects_and_names_each_failing_slice():
    verdict = gate({"a": 0.90, "b": 0.80, "c": 0.7}, {"a": 0.85, "b": 0.80, "c": 0.60}, tolerance=0.02)
    assert not verdict.accepted
    assert [(r.slice, round(r.drop, 3)) for r in verdict.regressions] == [("a", 0.05), ("c", 0.1)]
    assert "a: 0.900 -> 0.850" in verdict.reason and "c: 0.700 -> 0.600" in verdict.reason


def test_a_slice_the_candidate_was_not_measured_on_is_a_regression():
    assert not gate({"a": 0.9}, {}, tolerance=0.5).accepted


def _digits_slices():
    """sklearn's 8x8 digits as two slices ("upright", "flipped"), each with train and held-out parts."""
    ds = load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds.x), generator=gen)
    x, y = model_input(ds.x[order], ds.data_type), ds.y[order]
    half = len(x) // 2
    parts = {"upright": (x[:half], y[:half]), "flipped": (x[half:].flip(-1), y[half:])}
    out = {}
    for name, (xs, ys) in parts.items():
        cut = int(len(xs) * 0.7)
        out[name] = {"train": (xs[:cut], ys[:cut]), "heldout": (xs[cut:], ys[cut:])}
    return out


def test_gate_rejects_a_merge_with_a_child_trained_on_shuffled_labels():
    slices = _digits_slices()
    torch.manual_seed(0)
    model = TabularMLP(in_features=64, num_classes=10, width=32)
    x_up, y_up = slices["upright"]["train"]
    fit(model, x_up, y_up, epochs=15, lr=3e-3, generator=torch.Generator().manual_seed(0))
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def child(shuffle: bool):
        model.load_state_dict(base)                          # children start from the served weights
        x_new, y_new = slices["flipped"]["train"]
        x, y = torch.cat([x_new, x_up]), torch.cat([y_new, y_up])     # new slice + replay, as the engine does
        if shuffle:
            y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
        fit(model, x, y, epochs=15, lr=3e-3, generator=torch.Generator().manual_seed(2))
        return {k: v.clone() for k, v in model.state_dict().items()}

    good, bad = child(shuffle=False), child(shuffle=True)

    def heldout_accuracy(state):
        model.load_state_dict(state)
        return {name: accuracy(model, *s["heldout"]) for name, s in slices.items()}

    served = heldout_accuracy(base)
    assert served["upright"] > 0.9                           # a base worth protecting

    # tolerance 0.05: merging the good child alone costs "upright" about 0.04 on this small model
    accepted = gate(served, heldout_accuracy(apply_plan(AVERAGE, base, [good])), tolerance=0.05)
    assert accepted.accepted, accepted.reason

    candidate = heldout_accuracy(apply_plan(AVERAGE, base, [good, bad]))
    verdict = gate(served, candidate, tolerance=0.05)
    assert not verdict.accepted
    failed = {r.slice: r for r in verdict.regressions}
    assert "upright" in failed                               # the slice the bad child wrecked
    r = failed["upright"]
    assert r.served == served["upright"] and r.candidate == candidate["upright"] and r.drop > 0.05
    assert f"upright: {r.served:.3f} -> {r.candidate:.3f}" in verdict.reason
