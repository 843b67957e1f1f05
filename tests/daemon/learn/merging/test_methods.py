"""Merge methods on hand-built tensors whose answers are worked out by hand."""

import pytest
import torch
from pydantic import ValidationError

from daemon.learn.merging.methods import METHODS, compatible, relative_weights, trim_top_magnitude
from daemon.learn.merging.plans import MergePlan, UnitPlan, apply_plan


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def merge_state(name, base, children, weights=None, **params):
    """``base + method(tau_1..tau_n)``: a model-level plan of one method."""
    return apply_plan(MergePlan("model", {"model": UnitPlan(name, params)}), base, children, weights)


def merged_task_vector(name, base, children, weights=None, **params):
    """``lam * method(tau_1..tau_n)``, without the base."""
    merged = merge_state(name, base, children, weights, **params)
    return {k: merged[k] - base[k] for k in base if base[k].is_floating_point()}


def states(base, *children, key="w"):
    return {key: base}, [{key: c} for c in children]


def test_registry_names_and_defaults():
    assert set(METHODS) == {"average", "task_arithmetic", "ties", "magmax"}
    assert METHODS["magmax"].defaults == {"lam": 0.5}
    assert METHODS["ties"].defaults == {"density": 0.2, "lam": 0.55}
    assert METHODS["task_arithmetic"].defaults == {"lam": 1.0}
    assert METHODS["average"].defaults == {"lam": 1.0}
    assert list(METHODS["ties"].defaults) == ["density", "lam"]      # a plan's JSON lists lam last
    assert "TIES" in METHODS["ties"].reference and "MagMax" in METHODS["magmax"].reference


def test_parameters_are_typed():
    ties = METHODS["ties"]
    assert ties.validate(density=0.5).density == 0.5
    with pytest.raises(ValidationError):
        ties.validate(density=1.5)                                   # a share of entries
    with pytest.raises(ValidationError):
        ties.validate(lam="much")
    with pytest.raises(ValidationError):
        ties.validate(lam=float("nan"))


def test_average_is_weighted_mean_of_task_vectors():
    base, kids = states(t(1.0, 1.0), t(3.0, 1.0), t(1.0, 5.0))  # taus (2,0) and (0,4)
    merged = merge_state("average", base, kids, [3.0, 1.0])
    # (3*(2,0) + 1*(0,4)) / 4 = (1.5, 1.0); + base
    assert torch.equal(merged["w"], t(2.5, 2.0))
    assert torch.equal(merge_state("average", base, kids)["w"], t(2.0, 3.0))


def test_task_arithmetic_sums_with_mean_one_weights_and_lambda():
    base, kids = states(t(1.0, 1.0), t(3.0, 1.0), t(1.0, 5.0))     # taus (2,0) and (0,4)
    merged = merge_state("task_arithmetic", base, kids, [1.5, 0.5], lam=0.5)
    # 0.5 * (1.5*(2,0) + 0.5*(0,4)) = (1.5, 1); + base
    assert torch.equal(merged["w"], t(2.5, 2.0))
    # weights are relative: slice sizes 300 and 100 are the same weights (scaled to mean 1)
    assert torch.equal(merge_state("task_arithmetic", base, kids, [300, 100], lam=0.5)["w"], t(2.5, 2.0))
    # unit weights: Ilharco's plain sum
    assert torch.equal(merge_state("task_arithmetic", base, kids)["w"], t(3.0, 5.0))


def test_magmax_picks_largest_magnitude_with_sign():
    base, kids = states(t(0.0, 0.0, 0.0), t(1.0, -5.0, 2.0), t(-3.0, 4.0, 0.5))
    tau = merged_task_vector("magmax", base, kids)["w"]
    assert torch.equal(tau, t(-1.5, -2.5, 1.0))  # lam 0.5 * (-3, -5, 2)
    assert torch.equal(merge_state("magmax", base, kids, lam=1.0)["w"], t(-3.0, -5.0, 2.0))


def test_magmax_ties_go_to_the_newest_child():
    base, kids = states(t(10.0, 10.0), t(12.0, 8.0), t(8.0, 12.0), t(12.0, 7.0))
    # taus: (2,-2), (-2,2), (2,-3): element 0 ties at |2| three ways -> newest (+2 from child 3);
    # element 1: |-3| wins outright.
    assert torch.equal(merge_state("magmax", base, kids, lam=1.0)["w"], t(12.0, 7.0))
    base, kids = states(t(0.0), t(2.0), t(-2.0))
    assert torch.equal(merge_state("magmax", base, kids, lam=1.0)["w"], t(-2.0))
    base, kids = states(t(0.0), t(-2.0), t(2.0))
    assert torch.equal(merge_state("magmax", base, kids, lam=1.0)["w"], t(2.0))


def test_magmax_ignores_children_of_weight_zero():
    base, kids = states(t(0.0), t(1.0), t(-9.0))
    assert torch.equal(merge_state("magmax", base, kids, [1.0, 0.0], lam=1.0)["w"], t(1.0))


def test_trim_keeps_exactly_k_largest_per_child():
    stacked = torch.stack([t(0.1, -0.9, 0.3, 0.5, -0.2), t(1.0, 1.0, 1.0, 0.0, -2.0)])
    out = trim_top_magnitude(stacked, 0.4)  # k = floor(0.4*5) = 2
    assert torch.equal(out[0], t(0.0, -0.9, 0.0, 0.5, 0.0))
    # child 2: -2.0 and then one of three tied 1.0s: the lowest index is kept
    assert torch.equal(out[1], t(1.0, 0.0, 0.0, 0.0, -2.0))
    # k is at least 1; density 1 keeps everything
    assert torch.equal(trim_top_magnitude(t(0.2, -0.3).unsqueeze(0), 0.2)[0], t(0.0, -0.3))
    assert torch.equal(trim_top_magnitude(stacked, 1.0), stacked)


def test_ties_trim_elect_disjoint_mean_by_hand():
    # three children, 5 entries each, density 0.4 -> keep 2 largest |tau| per child
    base = t(0.0, 0.0, 0.0, 0.0, 0.0)
    taus = [t(4.0, -1.0, 0.5, 3.0, 0.1),    # keeps 4 (e0), 3 (e3)
            t(-2.0, 0.2, -5.0, 0.3, 0.0),   # keeps -2 (e0), -5 (e2)
            t(1.0, 6.0, 0.0, -1.0, -2.0)]   # keeps 6 (e1), -2 (e4)
    b, kids = states(base, *taus)
    merged = merge_state("ties", b, kids, [1.0, 2.0, 1.0], density=0.4, lam=1.0)["w"]
    # e0: weighted kept 4*1, -2*2 -> sum 0 -> elected +1 (ties to +); kept: child1 (w 1) -> 4/1 = 4
    # e1: only 6*1 -> +, 6/1 = 6
    # e2: -5*2 = -10 -> -, kept child2 (w2): -10/2 = -5
    # e3: 3*1 -> +3
    # e4: -2*1 -> -2
    assert torch.equal(merged, t(4.0, 6.0, -5.0, 3.0, -2.0))


def test_ties_sign_election_by_mass_and_divides_by_kept_weights():
    base = t(0.0, 0.0)
    b, kids = states(base, t(1.0, -1.0), t(2.0, -4.0), t(-6.0, 1.0))
    merged = merge_state("ties", b, kids, density=1.0, lam=0.5)["w"]
    # e0: mass 1+2-6 = -3 -> negative; only -6 agrees -> -6/1; * 0.5 = -3
    # e1: mass -1-4+1 = -4 -> negative; -1 and -4 agree -> -5/2 = -2.5; * 0.5 = -1.25
    assert torch.equal(merged, t(-3.0, -1.25))
    # weights (1, 3, 1): e0 weighted 1, 6, -6 -> mass 1 -> positive; (1 + 6) / (1 + 3) = 1.75
    #                    e1 weighted -1, -12, 1 -> negative; (-1 - 12) / (1 + 3) = -3.25
    merged = merge_state("ties", b, kids, [1.0, 3.0, 1.0], density=1.0, lam=1.0)["w"]
    assert torch.allclose(merged, t(1.75, -3.25), rtol=1e-6, atol=0)


def test_ties_default_density_and_zero_everywhere():
    base = torch.zeros(10)
    b, kids = states(base, torch.arange(10.0), -torch.arange(10.0) * 0.5)
    merged = merged_task_vector("ties", b, kids)["w"]
    # density 0.2 of 10 -> 2 kept per child: child1 keeps 8, 9; child2 keeps -4, -4.5 at the same spots
    # mass at 8: 8-4 = 4 > 0 -> keep 8 -> 8; at 9: 9-4.5 > 0 -> 9; elsewhere nothing kept -> 0
    expected = torch.zeros(10)
    expected[8], expected[9] = 0.55 * 8.0, 0.55 * 9.0
    assert torch.allclose(merged, expected, atol=0, rtol=1e-6)


def test_integer_buffers_are_copied_from_the_base():
    base = {"a": t(1.0), "b": t(1.0), "n": torch.tensor([7])}
    kids = [{"a": t(3.0), "b": t(2.0), "n": torch.tensor([9])}]
    merged = merge_state("average", base, kids)
    assert torch.equal(merged["a"], t(3.0)) and torch.equal(merged["b"], t(2.0))
    assert torch.equal(merged["n"], torch.tensor([7]))
    assert merged["n"] is not base["n"]


def test_merge_rejects_bad_input():
    base, kids = states(t(0.0), t(1.0))
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_state("nope", base, kids)
    with pytest.raises(ValueError, match="distill"):
        merge_state("distill", base, kids)
    with pytest.raises(ValueError, match="weights"):
        merge_state("average", base, kids, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        merge_state("average", base, kids, [-1.0])
    with pytest.raises(ValueError, match="no parameter"):
        merge_state("magmax", base, kids, density=0.3)
    with pytest.raises(ValueError, match="distill"):
        merge_state("average", base, [{"w": torch.zeros(2)}])


def test_helpers():
    assert relative_weights([800, 400]).tolist() == pytest.approx([4 / 3, 2 / 3])
    with pytest.raises(ValueError, match="positive sum"):
        relative_weights([0.0, 0.0])
    assert compatible({"a": torch.zeros(2)}, {"a": torch.ones(2)})
    assert not compatible({"a": torch.zeros(2)}, {"a": torch.ones(3)})
    assert not compatible({"a": torch.zeros(2)}, {"b": torch.ones(2)})


def test_merge_keeps_dtypes_and_leaves_inputs_alone():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    child = {"w": torch.tensor([3.0, 2.0], dtype=torch.bfloat16)}
    merged = merge_state("magmax", base, [child])
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"].float(), t(2.0, 2.0))
    assert torch.equal(child["w"].float(), t(3.0, 2.0)) and torch.equal(base["w"].float(), t(1.0, 2.0))
