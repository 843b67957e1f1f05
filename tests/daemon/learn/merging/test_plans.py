"""Merge plans: units by group and layer, their application, JSON, and refinement to a finer level."""

import json

import pytest
import torch

from daemon.learn.merging.plans import MergePlan, UnitPlan, apply_plan, layer_groups, layers
from tests.daemon.learn.merging.toys import KEYS, MAGMAX_1, toy_states


def test_layer_groups_default_and_prefixes():
    keys = KEYS + ["norm.weight"]
    assert layer_groups(keys) == {"features": KEYS[:3], "head": KEYS[3:], "other": ["norm.weight"]}
    assert layer_groups(keys, {"early": "stages.0.", "rest": ("stages.1.", "head.", "norm.")}) == {
        "early": KEYS[:2], "rest": KEYS[2:] + ["norm.weight"]}


def test_layers_one_unit_per_module():
    assert layers(KEYS) == {"stages.0.0": KEYS[:2], "stages.1.gru": [KEYS[2]], "head": KEYS[3:]}


def test_default_groups_match_the_model_families():
    from daemon.learn.models import ImageCNN
    groups = layer_groups(ImageCNN(width=2).state_dict())
    assert set(groups) == {"features", "head"} and groups["head"] == ["head.weight", "head.bias"]


def test_apply_plan_touches_only_each_units_keys():
    base, kids = toy_states()
    plan = MergePlan("group", {"features": UnitPlan("magmax", {"lam": 1.0}), "head": UnitPlan("average")},
                     {"features": ("stages.",), "head": ("head.",)})
    merged = apply_plan(plan, base, kids, [1.0, 3.0])
    for k in KEYS[:3]:
        assert torch.equal(merged[k], MAGMAX_1)                              # magmax ignores weights
    for k in KEYS[3:]:
        assert torch.equal(merged[k], torch.tensor([2.5, 0.25, 0.0]))        # (1*c1 + 3*c2) / 4
    assert torch.equal(merged["steps"], torch.tensor([5]))


def test_plan_roundtrips_through_json_and_refines():
    plan = MergePlan.uniform("group", UnitPlan("ties", {"density": 0.5}), KEYS)
    again = MergePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.units["head"].params == {"density": 0.5, "lam": 0.55}       # defaults filled in
    assert plan.to_dict() == {"level": "group",
                              "units": {"features": {"method": "ties", "params": {"density": 0.5, "lam": 0.55}},
                                        "head": {"method": "ties", "params": {"density": 0.5, "lam": 0.55}}},
                              "groups": {"features": ["stages."], "head": ["head."]}}
    mixed = plan.with_unit("head", UnitPlan("average"))
    fine = mixed.at_level("layer", KEYS)
    assert fine.level == "layer"
    assert fine.units["stages.0.0"].method == "ties" and fine.units["head"].method == "average"
    base, kids = toy_states()
    assert all(torch.equal(a, b) for a, b in zip(apply_plan(fine, base, kids).values(),
                                                  apply_plan(mixed, base, kids).values()))
    with pytest.raises(ValueError, match="cannot turn"):
        fine.at_level("model", KEYS)
    with pytest.raises(KeyError, match="no unit"):
        MergePlan("layer", {"head": UnitPlan("average")}).assignments(KEYS)
    with pytest.raises(ValueError, match="unknown merge method"):
        UnitPlan.from_dict({"method": "nope"})
