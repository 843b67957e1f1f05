"""Merge plans, their application, and the granularity controller on toy evaluate callbacks."""

import json

import pytest
import torch

from daemon.granularity import (GranularityController, MergePlan, UnitPlan, apply_plan, layer_groups,
                                layers)
from daemon.merge import merge_state

KEYS = ["stages.0.0.weight", "stages.0.0.bias", "stages.1.gru.weight_ih_l0", "head.weight", "head.bias"]


def toy_states():
    base = {k: torch.zeros(3) for k in KEYS}
    base["steps"] = torch.tensor([5])                       # integer buffer: never merged
    child1 = {k: torch.tensor([1.0, -2.0, 3.0]) for k in KEYS}
    child2 = {k: torch.tensor([3.0, 1.0, -1.0]) for k in KEYS}
    for c in (child1, child2):
        c["steps"] = torch.tensor([9])
    return base, [child1, child2]


def test_layer_groups_default_and_prefixes():
    keys = KEYS + ["norm.weight"]
    assert layer_groups(keys) == {"features": KEYS[:3], "head": KEYS[3:], "other": ["norm.weight"]}
    assert layer_groups(keys, {"early": "stages.0.", "rest": ("stages.1.", "head.", "norm.")}) == {
        "early": KEYS[:2], "rest": KEYS[2:] + ["norm.weight"]}


def test_layers_one_unit_per_module():
    assert layers(KEYS) == {"stages.0.0": KEYS[:2], "stages.1.gru": [KEYS[2]], "head": KEYS[3:]}


def test_apply_plan_touches_only_each_units_keys():
    base, kids = toy_states()
    plan = MergePlan("group", {"features": UnitPlan("magmax", {"lam": 1.0}),
                               "head": UnitPlan("average", weights=(1.0, 3.0))},
                     {"features": ("stages.",), "head": ("head.",)})
    merged = apply_plan(plan, base, kids, [1.0, 1.0])
    for k in KEYS[:3]:
        assert torch.equal(merged[k], torch.tensor([3.0, -2.0, 3.0]))        # magmax, lam 1
    for k in KEYS[3:]:
        assert torch.equal(merged[k], torch.tensor([2.5, 0.25, 0.0]))        # (1*c1 + 3*c2) / 4
    assert torch.equal(merged["steps"], torch.tensor([5]))
    # equals merge_state restricted to the unit's keys
    ref = merge_state("magmax", base, kids, keys=KEYS[:3], lam=1.0)
    assert all(torch.equal(ref[k], merged[k]) for k in KEYS[:3])


def test_plan_roundtrips_through_json_and_refines():
    plan = MergePlan.uniform("group", UnitPlan("ties", {"density": 0.5}), KEYS)
    again = MergePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.units["head"].params == {"density": 0.5, "lam": 0.55}
    fine = plan.with_unit("head", UnitPlan("average")).at_level("layer", KEYS)
    assert fine.level == "layer"
    assert fine.units["stages.0.0"].method == "ties" and fine.units["head"].method == "average"
    base, kids = toy_states()
    assert all(torch.equal(a, b) for a, b in zip(apply_plan(fine, base, kids).values(),
                                                  apply_plan(plan.with_unit("head", UnitPlan("average")),
                                                             base, kids).values()))
    with pytest.raises(KeyError, match="no unit"):
        MergePlan("layer", {"head": UnitPlan("average")}).assignments(KEYS)


def _toy_evaluate(target_by_key):
    """Accuracy per 'slice' = 1 - mean |state - target| over that slice's keys."""
    def evaluate(state):
        return {name: 1.0 - float(sum((state[k] - tgt).abs().mean() for k in keys_tgt for tgt in [target_by_key[k]])
                                  / len(keys_tgt))
                for name, keys_tgt in (("feat", KEYS[:3]), ("head", KEYS[3:]))}
    return evaluate


def test_controller_picks_the_known_better_group_plan():
    base, kids = toy_states()
    mm = torch.tensor([3.0, -2.0, 3.0])        # magmax with lam 1
    avg = torch.tensor([2.0, -0.5, 1.0])       # average
    target = {k: mm if k.startswith("stages.") else avg for k in KEYS}
    ctl = GranularityController(methods=[UnitPlan("average"), UnitPlan("magmax", {"lam": 1.0})],
                                scales=(1.0,), levels=("model", "group"))
    assert ctl.evaluation_budget(KEYS) == 2 + 2 * 1
    result = ctl.merge(base, kids, None, _toy_evaluate(target))
    assert result.evaluations == 4
    assert result.plan.level == "group"
    assert result.plan.units["features"] == UnitPlan("magmax", {"lam": 1.0})
    assert result.plan.units["head"] == UnitPlan("average")
    assert result.score.per_slice == {"feat": 1.0, "head": 1.0}
    assert torch.equal(result.state["stages.0.0.bias"], mm) and torch.equal(result.state["head.bias"], avg)
    assert result.best_by_level["model"].mean < 1.0
    d = result.to_dict()
    json.dumps(d)
    assert d["evaluations"] == 4 and d["plan"]["level"] == "group" and len(d["candidates"]) == 4


def test_controller_prefers_simpler_plan_and_baseline_on_ties():
    base, kids = toy_states()
    result = GranularityController().merge(base, kids, None, lambda s: {"a": 0.5, "b": 0.5})
    assert result.plan == MergePlan("model", {"model": UnitPlan("average")})
    assert result.evaluations == GranularityController().evaluation_budget(base)
    # 4 methods x 3 scales at model level, then (2 groups + 3 layers) x 11 alternatives
    assert result.evaluations == 12 + (2 + 3) * 11


def test_controller_uses_worst_slice_as_tie_break_and_min_gain():
    base, kids = toy_states()

    def evaluate(state):  # magmax: same mean, better worst
        if torch.equal(state["head.bias"], torch.tensor([1.5, -1.0, 1.5])):
            return {"a": 0.6, "b": 0.8}
        return {"a": 0.5, "b": 0.9}
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model",))
    assert ctl.merge(base, kids, None, evaluate).plan.units["model"].method == "magmax"

    mm, avg = torch.tensor([1.5, -1.0, 1.5]), torch.tensor([2.0, -0.5, 1.0])

    def evaluate2(state):  # only the mixed plan (features average, head magmax) adds 0.01
        mixed = torch.equal(state["head.bias"], mm) and torch.equal(state["stages.0.0.bias"], avg)
        return {"a": 0.61 if mixed else 0.6}
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model", "layer"))
    result = ctl.merge(base, kids, None, evaluate2)
    assert result.plan.level == "layer" and result.plan.units["head"].method == "magmax"
    assert result.score.mean == pytest.approx(0.61)
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model", "layer"),
                                min_gain=0.05)
    result = ctl.merge(base, kids, None, evaluate2)
    assert result.plan == MergePlan("model", {"model": UnitPlan("average")})
    assert result.best_by_level["layer"].mean == pytest.approx(0.6)


def test_pinned_mode_applies_without_search():
    base, kids = toy_states()
    calls = []
    ctl = GranularityController.pin("group", "magmax", lam=1.0)
    result = ctl.merge(base, kids, [1.0, 1.0], lambda s: calls.append(1) or {"a": 0.7})
    assert result.mode == "pinned" and len(calls) == 1 and result.score.mean == 0.7
    assert result.plan.level == "group" and set(result.plan.units) == {"features", "head"}
    assert torch.equal(result.state["head.weight"], torch.tensor([3.0, -2.0, 3.0]))
    plan = MergePlan("model", {"model": UnitPlan("average")})
    result = GranularityController(pinned=plan).merge(base, kids)
    assert result.score is None and result.candidates == []
    assert torch.equal(result.state["head.weight"], torch.tensor([2.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match="evaluate"):
        GranularityController().merge(base, kids)
