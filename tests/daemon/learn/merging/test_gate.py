"""The publish gate: the paired test (worse overall is always rejected, a new slice at a small cost
is published, a clear regression is named), the weights, JSON verdicts; and the accuracy-only check."""

import json
import math
from dataclasses import asdict
from statistics import NormalDist

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tools.datasets import load_dataset
from daemon.learn.merging.gate import (DEFAULT_ALPHA, DEFAULT_TOLERANCE, EXACT_SUPPORT, correctness, gate, paired_gate,
                                       recency_weights)
from daemon.learn.merging.plans import MergePlan, UnitPlan, apply_plan
from daemon.learn.models import TabularMLP
from daemon.learn.training import accuracy, fit, model_input

AVERAGE = MergePlan("model", {"model": UnitPlan("average")})
Z_ALPHA = NormalDist().inv_cdf(1 - DEFAULT_ALPHA)


def pair(n: int, served_right: int, lost: int, gained: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Served correctness (the first ``served_right`` of ``n`` rows) and a candidate that gets
    ``lost`` of those wrong and ``gained`` of the others right."""
    assert lost <= served_right and gained <= n - served_right
    a = torch.arange(n) < served_right
    b = a.clone()
    b[:lost] = False
    b[served_right:served_right + gained] = True
    return a, b


def gate_of(slices: dict, **kw):
    return paired_gate({s: a for s, (a, _) in slices.items()}, {s: b for s, (_, b) in slices.items()}, **kw)


def reference(served: dict, candidate: dict, weights: dict | None):
    """The weighted paired gain and McNemar-type z, computed independently of the gate (float64)."""
    names = [s for s in served if len(served[s])]
    w = torch.tensor([1.0 if weights is None else weights[s] for s in names], dtype=torch.float64)
    w = w / w.sum()
    gain, var, step = 0.0, 0.0, 0.0
    for wi, s in zip(w.tolist(), names):
        a, b = served[s].double(), candidate[s].double()
        n = len(a)
        d = b - a
        gain += wi * d.mean().item()
        var += wi ** 2 * d.abs().sum().item() / n ** 2
        if d.abs().sum() > 0:
            step = max(step, wi / n)
    z = math.copysign(max(abs(gain) - step, 0), gain) / math.sqrt(var) if var > 0 else 0.0
    return gain, z


def brute_force_p(served, candidate, weights=None, max_rows=16, draws=None):
    """P0(sign-flipped gain >= observed) by enumerating every sign of every discordant row (None
    beyond ``max_rows`` discordant rows, or without any): the exact test, computed the slow way.
    With ``draws``, a Monte Carlo estimate from that many random sign flips instead, for any size."""
    names = [s for s in served if len(served[s])]
    w = torch.tensor([1.0 if weights is None else weights[s] for s in names], dtype=torch.float64)
    w = w / w.sum()
    values, observed = [], 0.0
    for wi, s in zip(w.tolist(), names):
        d = candidate[s].double() - served[s].double()
        for sign in d[d != 0].tolist():
            values.append(wi / len(d))
            observed += sign * wi / len(d)
    if not values:
        return None
    if draws:
        signs = torch.randint(0, 2, (draws, len(values)), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
        sums = signs.double() @ torch.tensor(values, dtype=torch.float64)
        return float((sums >= observed - 1e-12).double().mean())
    if len(values) > max_rows:
        return None
    signs = torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(len(values))]
                          for i in range(2 ** len(values))], dtype=torch.float64)
    sums = signs @ torch.tensor(values, dtype=torch.float64)
    return float((sums >= observed - 1e-12).double().mean())


# --- (1) worse overall is always rejected -----------------------------------------------------------------
@st.composite
def candidates(draw, worse: bool):
    """1-6 slices of 1-300 rows, random weights (or none); the candidate loses served-right rows at
    one rate and gains served-wrong rows at another (``worse``: loses more than it gains)."""
    k = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    served, cand, weights = {}, {}, {}
    for i in range(k):
        n = draw(st.integers(1, 300))
        acc = draw(st.floats(0.0, 1.0))
        lose = draw(st.floats(0.05, 0.6) if worse else st.floats(0.0, 0.6))
        gain = draw(st.floats(0.0, lose / 3) if worse else st.floats(0.0, 0.6))
        a = torch.rand(n, generator=gen) < acc
        u = torch.rand(n, generator=gen)
        served[f"s{i}"], cand[f"s{i}"] = a, torch.where(a, u >= lose, u < gain)
        weights[f"s{i}"] = draw(st.floats(0.01, 10.0))
    return served, cand, (weights if draw(st.booleans()) else None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candidates(worse=False))
def test_a_candidate_that_is_not_better_overall_is_never_accepted(case):
    served, cand, weights = case
    gain, z = reference(served, cand, weights)
    verdict = paired_gate(served, cand, weights=weights)
    assert verdict.gain == pytest.approx(gain, abs=1e-9) and verdict.z == pytest.approx(z, abs=1e-6)
    exact = brute_force_p(served, cand, weights)
    if exact is not None:   # few discordant rows: the gate's p-value is the exact one
        assert verdict.p_value == pytest.approx(exact, abs=1e-9)
        p_ref, slack = exact, 0.0
    else:                   # more: 20,000 random sign flips (sd of the estimate <= 0.0035)
        p_ref, slack = brute_force_p(served, cand, weights, draws=20_000), 0.015
        p_ref = 1.0 if p_ref is None else p_ref   # no discordant row
        if 0 < math.prod(st.gained + st.lost + 1 for st in verdict.slices) <= EXACT_SUPPORT:   # exact there too
            assert verdict.p_value == pytest.approx(p_ref, abs=slack)
    if gain <= 0 or p_ref > DEFAULT_ALPHA + slack:
        assert not verdict.accepted, verdict.reason
    if verdict.accepted:   # what acceptance means, whatever the draw
        assert verdict.gain > 0 and verdict.p_value <= DEFAULT_ALPHA and not verdict.regressions


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candidates(worse=True), st.floats(0.0, 1.0), st.sampled_from([0.01, 0.05, 0.2, 0.5]))
def test_a_candidate_worse_overall_by_the_paired_test_is_always_rejected(case, tolerance, alpha):
    served, cand, weights = case
    gain, z = reference(served, cand, weights)
    verdict = paired_gate(served, cand, weights=weights, tolerance=tolerance, alpha=alpha)
    if z < -NormalDist().inv_cdf(1 - alpha):                       # worse overall by the paired test
        assert not verdict.accepted and "worse overall" in verdict.reason
    assert gain > 0 or not verdict.accepted                        # and so is anything not better


def test_one_slice_is_mcnemars_test():
    a, b = pair(200, 150, lost=4, gained=16)
    v = paired_gate({"s": a}, {"s": b})
    assert v.z == pytest.approx((16 - 4 - 1) / math.sqrt(16 + 4))   # the corrected statistic, reported
    assert (v.gained, v.lost, v.rows) == (16, 4, 200) and v.gain == pytest.approx(12 / 200)
    exact = sum(math.comb(20, k) for k in range(16, 21)) / 2 ** 20   # McNemar's exact (binomial) p-value
    assert v.accepted and v.p_value == pytest.approx(exact)


def test_few_discordant_rows_are_judged_exactly():
    # 5 rows gained and none lost over three recency-weighted slices: the normal approximation said
    # p 0.06 (rejected); five fair coins all landing "gained" has probability 1/32
    served = {s: torch.zeros(100, dtype=torch.bool) for s in ("old", "mid", "new")}
    cand = {s: t.clone() for s, t in served.items()}
    cand["old"][:2] = True
    cand["new"][:3] = True
    v = paired_gate(served, cand, weights={"old": 0.2, "mid": 0.5, "new": 1.0})
    assert v.accepted and v.p_value == pytest.approx(1 / 32)
    assert 1 - NormalDist().cdf(v.z) > DEFAULT_ALPHA     # what the approximation alone would have said
    cand["mid"][:1] = True                                 # one more gained row: still exact
    cand["mid"][50] = False
    served["mid"][50] = True                               # and one lost
    v = paired_gate(served, cand, weights={"old": 0.2, "mid": 0.5, "new": 1.0})
    assert v.p_value == pytest.approx(brute_force_p(served, cand, {"old": 0.2, "mid": 0.5, "new": 1.0}))


def test_an_observed_sum_that_several_slices_reach_counts_whole():
    # two slices of equal row weight: the observed sum is reached by many sign combinations, summed in
    # different orders; every one must count (a float-exact cut once dropped part of that atom: 0.883)
    a0, b0 = pair(52, 20, lost=7, gained=4)
    a1, b1 = pair(52, 20, lost=11, gained=8)
    v = paired_gate({"s0": a0, "s1": a1}, {"s0": b0, "s1": b1})
    exact = sum(math.comb(30, k) for k in range(12, 31)) / 2 ** 30   # 30 fair signs, at least 12 "gained"
    assert v.p_value == pytest.approx(exact)


def test_many_discordant_rows_fall_back_to_the_normal_approximation():
    a, b = pair(3000, 1500, lost=400, gained=500)   # 901 sums per slice; three slices: 901^3 > EXACT_SUPPORT
    sets_a = {f"s{i}": a for i in range(3)}
    sets_b = {f"s{i}": b for i in range(3)}
    v = paired_gate(sets_a, sets_b)
    assert v.p_value == pytest.approx(1 - NormalDist().cdf(v.z))


# --- (2) a new slice at a small cost elsewhere is published -----------------------------------------------
@pytest.mark.parametrize("rows", [150, 76])
def test_a_merge_that_adds_a_slice_at_a_small_cost_elsewhere_is_accepted(rows):
    new = pair(rows, served_right=round(0.2 * rows), lost=2, gained=round(0.7 * rows) + 2)   # 0.2 -> 0.9
    old = round(0.9 * rows)
    slices = {"new": new, "old1": pair(rows, old, lost=3, gained=1), "old2": pair(rows, old, lost=2, gained=1)}
    assert [round(b.float().mean().item() - a.float().mean().item(), 3) for a, b in slices.values()][1:] \
        == ([-0.013, -0.007] if rows == 150 else [-0.026, -0.013])
    verdict = gate_of(slices)
    assert verdict.accepted, verdict.reason
    assert verdict.regressions == () and verdict.gain > 0.2 and verdict.p_value < 1e-6
    assert verdict.reason.startswith("better overall")
    by_slice = {s.slice: s for s in verdict.slices}
    assert by_slice["old1"].diff < 0 and not by_slice["old1"].regressed


# --- (3) a clear regression is rejected and named ---------------------------------------------------------
@pytest.mark.parametrize("rows, served_right, lost, gained", [(150, 142, 24, 2), (75, 71, 12, 1)])
def test_a_clear_regression_on_one_slice_is_rejected_and_named(rows, served_right, lost, gained):
    upright = pair(rows, served_right, lost, gained)                                # 0.947 -> 0.800
    slices = {"upright": upright, "rotated": pair(rows, round(0.3 * rows), 0, round(0.6 * rows))}
    verdict = gate_of(slices)
    assert not verdict.accepted
    assert verdict.gain > 0 and verdict.p_value < 1e-3                              # better overall...
    (r,) = verdict.regressions                                                      # ...but not on upright
    assert (r.slice, r.rows, round(r.served, 3), round(r.candidate, 3)) == ("upright", rows, 0.947, 0.8)
    assert r.drop == pytest.approx(r.served - r.candidate) and r.drop_bound > DEFAULT_TOLERANCE
    assert "upright: 0.947 -> 0.800 (-0.147)" in verdict.reason and "rotated" not in verdict.reason


def test_a_small_slice_is_not_judged_on_noise():
    verdict = gate_of({"small": pair(20, 18, lost=2, gained=0), "big": pair(300, 100, 0, 150)})
    assert verdict.accepted, verdict.reason                  # 0.90 -> 0.80 on 20 rows: not evidence
    assert not gate_of({"small": pair(20, 18, 2, 0), "big": pair(300, 100, 0, 150)}, guard_alpha=0.5).accepted


def test_a_slice_the_candidate_was_not_measured_on_is_a_regression():
    a, b = pair(100, 50, 0, 40)
    verdict = paired_gate({"a": a, "gone": torch.ones(50, dtype=torch.bool)}, {"a": b})
    assert not verdict.accepted and [r.slice for r in verdict.regressions] == ["gone"]
    assert "gone: 1.000 -> not measured" in verdict.reason


# --- (4) identical models, no gain ------------------------------------------------------------------------
def test_identical_models_are_not_accepted():
    a = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.8
    verdict = paired_gate({"s": a, "t": a[:100]}, {"s": a.clone(), "t": a[:100].clone()})
    assert not verdict.accepted and (verdict.gain, verdict.z, verdict.gained, verdict.lost) == (0, 0, 0, 0)
    assert verdict.reason.startswith("no gain")
    swapped = gate_of({"s": pair(200, 150, lost=10, gained=10)})          # same accuracy, other rows
    assert not swapped.accepted and swapped.gain == 0 and "not better overall" in swapped.reason
    assert not paired_gate({}, {}).accepted


def test_a_gain_within_noise_is_not_published():
    verdict = gate_of({"s": pair(250, 225, lost=4, gained=8)})          # +0.016 on 250 rows: z = 0.87
    assert not verdict.accepted and verdict.gain > 0 and verdict.p_value > DEFAULT_ALPHA
    assert "gain not significant" in verdict.reason
    assert gate_of({"s": pair(250, 225, lost=4, gained=8)}, alpha=0.5).accepted   # point-estimate mode


# --- (5) weights ------------------------------------------------------------------------------------------
def test_the_weights_decide_which_slices_count():
    slices = {"old": pair(150, 100, lost=2, gained=32),                 # +0.200
              "recent": pair(150, 135, lost=8, gained=2)}               # -0.040: within the guard
    equal = gate_of(slices)
    assert equal.accepted and equal.gain == pytest.approx(0.08), equal.reason
    weights = recency_weights({"old": 0, "recent": 10}, now=10, half_life=3)      # old: 2^(-10/3)
    assert weights["recent"] == 1 and weights["old"] == pytest.approx(2 ** (-10 / 3))
    recent = gate_of(slices, weights=weights)
    assert not recent.accepted and recent.gain < 0 and not recent.regressions
    by_slice = {s.slice: s.weight for s in recent.slices}
    assert sum(by_slice.values()) == pytest.approx(1) and by_slice["recent"] > 0.9
    assert gate_of(slices, weights={"old": 1, "recent": 0}).accepted              # weight 0: does not count
    with pytest.raises(ValueError, match="no weight"):
        gate_of(slices, weights={"old": 1})
    with pytest.raises(ValueError, match="sum to 0"):
        gate_of(slices, weights={"old": 0, "recent": 0})


# --- (6) every figure serialises --------------------------------------------------------------------------
def test_verdicts_serialise_to_json_with_their_figures():
    verdicts = [gate_of({"new": pair(150, 30, 2, 107), "old": pair(150, 135, 3, 1)}),
                gate_of({"upright": pair(150, 142, 24, 2), "rotated": pair(150, 45, 0, 90)}),
                paired_gate({"a": torch.ones(3, dtype=torch.bool)}, {}),
                gate({"a": 0.9}, {"a": float("nan")}, tolerance=0.02)]
    for v in verdicts:
        record = json.loads(json.dumps(asdict(v), allow_nan=False))
        assert record["accepted"] == v.accepted and record["reason"] == v.reason
        assert all(set(r) >= {"slice", "served", "candidate", "drop"} for r in record["regressions"])
    record = asdict(verdicts[1])
    assert {"gain", "se", "z", "p_value", "gained", "lost", "rows", "tolerance", "alpha"} <= set(record)
    assert [s["slice"] for s in record["slices"]] == ["rotated", "upright"]
    assert {"rows", "diff", "gained", "lost", "se", "drop_bound", "weight"} <= set(record["slices"][0])
    assert record["regressions"][0]["drop"] == pytest.approx(142 / 150 - 120 / 150)


def test_inputs_are_checked():
    a = torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="same rows"):
        paired_gate({"s": a}, {"s": a[:5]})
    with pytest.raises(ValueError, match="per-row correctness"):
        paired_gate({"s": torch.full((10,), 0.5)}, {"s": a})
    assert paired_gate({"s": torch.ones(10, dtype=torch.long)}, {"s": a}).reason.startswith("no gain")
    assert DEFAULT_TOLERANCE == paired_gate({"s": a}, {"s": a}).tolerance


# --- the accuracy-only point check (the merger's selection pre-filter) ------------------------------------
def test_accepts_within_tolerance_and_new_slices():
    verdict = gate({"a": 0.90, "b": 0.50}, {"a": 0.885, "b": 0.80, "new": 0.1}, tolerance=0.02)
    assert verdict.accepted and verdict.regressions == ()


def test_rejects_and_names_each_failing_slice():
    verdict = gate({"a": 0.90, "b": 0.80, "c": 0.7}, {"a": 0.85, "b": 0.80, "c": 0.60}, tolerance=0.02)
    assert not verdict.accepted
    assert [(r.slice, round(r.drop, 3)) for r in verdict.regressions] == [("a", 0.05), ("c", 0.1)]
    assert "a: 0.900 -> 0.850" in verdict.reason and "c: 0.700 -> 0.600" in verdict.reason


def test_a_slice_the_candidate_was_not_measured_on_is_a_regression_in_the_point_check():
    assert not gate({"a": 0.9}, {}, tolerance=0.5).accepted


# --- on real models -----------------------------------------------------------------------------------------
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
    heldout = {name: s["heldout"] for name, s in slices.items()}

    def judged(state):
        model.load_state_dict(state)
        return correctness(model, heldout)

    served = judged(base)
    model.load_state_dict(base)
    assert accuracy(model, *heldout["upright"]) == pytest.approx(served["upright"].float().mean().item())
    assert served["upright"].float().mean() > 0.9            # a base worth protecting

    accepted = paired_gate(served, judged(apply_plan(AVERAGE, base, [good])))
    assert accepted.accepted, accepted.reason                # the new slice comes in at a small cost

    verdict = paired_gate(served, judged(apply_plan(AVERAGE, base, [good, bad])))
    assert not verdict.accepted
    failed = {r.slice: r for r in verdict.regressions}
    assert "upright" in failed                               # the slice the bad child wrecked
    r = failed["upright"]
    assert r.served == pytest.approx(served["upright"].float().mean().item()) and r.drop > DEFAULT_TOLERANCE
    assert f"upright: {r.served:.3f} -> {r.candidate:.3f}" in verdict.reason
