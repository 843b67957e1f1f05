"""The granularity controller on toy score functions: what it picks, its costs and caps, and
choose_plan's pinned modes."""

import json

import pytest
import torch

from daemon.learn.merging.controller import GranularityController, choose_plan
from daemon.learn.merging.plans import MergePlan, UnitPlan, layers
from tests.daemon.learn.merging.toys import AVERAGE, KEYS, MAGMAX, MAGMAX_1, closeness_score, toy_states


def test_controller_picks_the_known_better_group_plan():
    base, kids = toy_states()
    target = {k: MAGMAX_1 if k.startswith("stages.") else AVERAGE for k in KEYS}
    ctl = GranularityController(methods=[UnitPlan("average"), UnitPlan("magmax", {"lam": 1.0})],
                                scales=(1.0,), levels=("model", "group"))
    result = ctl.merge(base, kids, None, closeness_score(target))
    assert result.evaluations == 4
    assert result.plan.level == "group"
    assert result.plan.units == {"features": UnitPlan("magmax", {"lam": 1.0}), "head": UnitPlan("average")}
    assert result.score.per_slice == {"feat": 1.0, "head": 1.0}
    assert torch.equal(result.state["stages.0.0.bias"], MAGMAX_1) and torch.equal(result.state["head.bias"], AVERAGE)
    assert result.best_by_level["model"].mean < 1.0
    d = json.loads(json.dumps(result.to_dict()))
    assert d["evaluations"] == 4 and d["plan"]["level"] == "group" and len(d["candidates"]) == 4
    assert d["mode"] == "auto" and d["skipped_levels"] == []


def test_lambda_scales_are_candidates():
    base, kids = toy_states()
    target = {k: AVERAGE * 0.5 for k in KEYS}                      # average at half its lambda
    result = GranularityController(methods=["average"], levels=("model",)).merge(base, kids, None,
                                                                                 closeness_score(target))
    assert result.plan.units["model"] == UnitPlan("average", {"lam": 0.5})
    assert [c.plan.units["model"].lam for c in result.candidates] == [1.0, 0.5, 1.5]


def test_controller_prefers_the_baseline_and_coarser_plans_on_ties():
    base, kids = toy_states()
    ctl = GranularityController()
    result = ctl.merge(base, kids, None, lambda s: {"a": 0.5, "b": 0.5})
    assert result.plan == MergePlan("model", {"model": UnitPlan("average")})
    # 4 methods x 3 scales at model level, then (2 groups + 3 layers) x 11 alternatives
    assert result.evaluations == 12 + (2 + 3) * 11


def test_min_gain_and_ties_keep_the_incumbent():
    base, kids = toy_states()

    def same_mean_better_worst(state):
        return {"a": 0.6, "b": 0.8} if torch.equal(state["head.bias"], MAGMAX) else {"a": 0.5, "b": 0.9}
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model",), min_gain=0.0)
    result = ctl.merge(base, kids, None, same_mean_better_worst)
    assert result.plan.units["model"].method == "average"          # a tied mean is no evidence
    assert [c.worst for c in result.candidates] == [0.5, 0.6]

    def mixed_plan_gains(state):  # only features=average + head=magmax adds 0.03
        mixed = torch.equal(state["head.bias"], MAGMAX) and torch.equal(state["stages.0.0.bias"], AVERAGE)
        return {"a": 0.63 if mixed else 0.6}
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model", "layer"))
    assert ctl.min_gain == 0.02
    result = ctl.merge(base, kids, None, mixed_plan_gains)
    assert result.plan.level == "layer" and result.plan.units["head"].method == "magmax"
    assert result.plan.units["stages.0.0"].method == "average"
    assert result.score.mean == pytest.approx(0.63)
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model", "layer"),
                                min_gain=0.05)
    result = ctl.merge(base, kids, None, mixed_plan_gains)
    assert result.plan == MergePlan("model", {"model": UnitPlan("average")})
    assert result.best_by_level["layer"].mean == pytest.approx(0.6)


def test_noise_sized_gains_keep_the_baseline():
    base, kids = toy_states()

    def score_fn(state):  # magmax looks 0.015 better: inside the noise of a few hundred samples
        return {"a": 0.615 if torch.equal(state["head.bias"], MAGMAX) else 0.6}
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model",))
    assert ctl.merge(base, kids, None, score_fn).plan.units["model"].method == "average"
    ctl = GranularityController(methods=["average", "magmax"], scales=(1.0,), levels=("model",), min_gain=0.01)
    assert ctl.merge(base, kids, None, score_fn).plan.units["model"].method == "magmax"


def test_max_evaluations_skips_finer_levels():
    base, kids = toy_states()
    ctl = GranularityController(max_evaluations=12 + 2 * 11)        # room for model + group, not layer
    calls = []
    result = ctl.merge(base, kids, None, lambda s: calls.append(1) or {"a": 0.5})
    assert len(calls) == result.evaluations == 34
    assert result.skipped_levels == ["layer"] and set(result.best_by_level) == {"model", "group"}


def test_choose_plan_pinned_method_and_level():
    base, kids = toy_states()
    calls = []
    result = choose_plan(base, kids, [1.0, 1.0], lambda s: calls.append(1) or {"a": 0.7}, method="magmax",
                         level="model")
    assert result.mode == "pinned" and len(calls) == 1 and result.score.mean == 0.7
    assert result.plan == MergePlan("model", {"model": UnitPlan("magmax")})
    assert torch.equal(result.state["head.weight"], MAGMAX)
    result = choose_plan(base, kids, None, None, method="average", level="model")     # no score: no figure
    assert result.score is None and result.candidates == []
    assert torch.equal(result.state["head.weight"], AVERAGE)
    with pytest.raises(ValueError, match="score_fn"):
        choose_plan(base, kids, None, None)
    with pytest.raises(ValueError, match="merge method"):
        choose_plan(base, kids, None, None, method="nope", level="model")
    with pytest.raises(ValueError, match="merge level"):
        choose_plan(base, kids, None, None, method="average", level="nope")


def test_choose_plan_pinned_method_searches_its_lambda_per_unit():
    base, kids = toy_states()
    target = {k: MAGMAX_1 if k.startswith("head.") else MAGMAX for k in KEYS}    # head wants lam 1
    result = choose_plan(base, kids, None, closeness_score(target), method="magmax", level="group",
                         scales=(1.0, 2.0))
    assert {u.method for u in result.plan.units.values()} == {"magmax"}
    assert result.plan.units == {"features": UnitPlan("magmax"), "head": UnitPlan("magmax", {"lam": 1.0})}
    assert result.candidates[0].plan == MergePlan("model", {"model": UnitPlan("magmax")})   # its baseline


def test_choose_plan_records_a_coarser_winner_at_the_pinned_level():
    base, kids = toy_states()
    result = choose_plan(base, kids, None, lambda s: {"a": 0.5}, level="layer")
    assert result.plan.level == "layer" and set(result.plan.units) == set(layers(KEYS))
    assert {u for u in result.plan.units.values()} == {UnitPlan("average")}
    assert result.score.plan == result.plan
