"""The weighting modes on hand-built fingerprints and tiny models (no servers).

The tiny model's features are its input (an identity first stage), so a fingerprint can be written
by hand in input space: slice ``a`` is centred at (+3, 0), slice ``b`` at (-3, 0), unit variance. Each
member's head answers one class whatever the input, so the labels say which member answered.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.learn.drift import FeatureKL
from daemon.learn.fingerprint import Fingerprint
from daemon.learn.models import Architecture, StagedModel
from daemon.serve import weighting as W
from daemon.serve.members import Member, ZooSnapshot
from daemon.serve.predictor import Predictor


class Tiny(StagedModel):
    def __init__(self, num_classes: int = 3, width: int = 2) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(2, width)])
        self.head = nn.Linear(width, num_classes)


def tiny(num_classes: int = 3, width: int = 2) -> nn.Module:
    return Tiny(num_classes, width)


TINY = Architecture(family="custom", params={"factory": f"{__name__}:tiny"})


def fingerprint(center, dims: int = 2) -> Fingerprint:
    center = torch.tensor([*center, *[0.0] * (dims - 2)], dtype=torch.float64)
    return Fingerprint(FeatureKL(center, torch.eye(dims, dtype=torch.float64), torch.ones(dims, dtype=torch.float64),
                                 100), 1.0, dims)


def member(line: str, answer: int, fingerprints: dict, metrics: dict, kind="member", arch=TINY, seed=0) -> Member:
    """A tiny member: identity features (plus small seeded noise in the weights, so members differ in
    every tensor) and a head that answers ``answer``."""
    model = arch.build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = model.stages[0]
        first.weight.copy_(torch.eye(2, first.out_features).T + 1e-3 * torch.randn(first.weight.shape, generator=g))
        first.bias.zero_()
        model.head.weight.copy_(1e-3 * torch.randn(model.head.weight.shape, generator=g))
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(answer), 3).float() * 5)
    return Member.build(line=line, version=1, kind=kind, architecture=arch, state=model.state_dict(),
                        fingerprints={s: fingerprint(c, model.head.in_features) for s, c in fingerprints.items()},
                        metrics=metrics)


A, B = (3.0, 0.0), (-3.0, 0.0)


@pytest.fixture
def zoo() -> ZooSnapshot:
    served = member("main", 2, {"a": A, "b": B}, {"a": 0.6, "b": 0.6}, kind="served", seed=1)
    ma = member("main.ca", 0, {"a": A}, {"a": 0.95}, seed=2)
    mb = member("main.cb", 1, {"b": B}, {"b": 0.95}, seed=3)
    return ZooSnapshot(served, (ma, mb))


def rows(center, n=16, seed=0) -> torch.Tensor:
    return torch.tensor(center) + 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_route_picks_the_member_whose_fingerprint_the_rows_come_from(zoo):
    p = Predictor(zoo, mode="route")
    x = torch.cat([rows(A), rows(B, seed=1)])
    pred = p.predict(x, data_type="tabular")
    assert pred.members == ("main:v1", "main.ca:v1", "main.cb:v1")
    assert pred.labels.tolist() == [0] * 16 + [1] * 16
    assert pred.weights[:16].argmax(1).eq(1).all() and pred.weights[16:].argmax(1).eq(2).all()
    assert torch.equal(pred.weights.sum(1), torch.ones(32))


def test_unknown_metrics_give_no_credit_and_ties_go_to_the_served_model(zoo):
    # served measured 0.6 on both; a member without a figure for a slice scores 0 there
    served, ma, _ = zoo.all
    lone = ZooSnapshot(served, (member("main.cx", 0, {"a": A}, {}, seed=4),))
    assert Predictor(lone, mode="route").predict(rows(A), data_type="tabular").labels.eq(2).all()
    equal = ZooSnapshot(served, (member("main.cy", 0, {"a": A, "b": B}, {"a": 0.6, "b": 0.6}, seed=5),))
    assert Predictor(equal, mode="route").predict(rows(A), data_type="tabular").labels.eq(2).all()


def test_blend_weights_sum_to_one_and_sharpen_as_temperature_falls(zoo):
    x = rows(A)
    tops = []
    for t in (1.0, 0.3, 0.1, 0.03, 0.01):
        pred = Predictor(zoo, mode="blend", temperature=t).predict(x, data_type="tabular")
        assert torch.allclose(pred.weights.sum(1), torch.ones(len(x)), atol=1e-6)
        assert torch.allclose(pred.probabilities.sum(1), torch.ones(len(x)), atol=1e-5)
        tops.append(pred.weights[:, 1].mean().item())
    assert tops == sorted(tops) and tops[0] < 0.5 and tops[-1] > 0.999


def test_served_mode_ignores_the_members(zoo):
    pred = Predictor(zoo, mode="served").predict(torch.cat([rows(A), rows(B)]), data_type="tabular")
    assert pred.members == ("main:v1",) and pred.weights.shape == (32, 1) and pred.labels.eq(2).all()
    alone = Predictor(ZooSnapshot(zoo.served), mode="served").predict(rows(A), data_type="tabular")
    for mode in ("route", "blend", "layerwise"):   # a zoo of one is the served model
        got = Predictor(ZooSnapshot(zoo.served), mode=mode).predict(rows(A), data_type="tabular")
        assert torch.allclose(got.probabilities, alone.probabilities, atol=1e-6), mode


@pytest.mark.parametrize("level", ["model", "group", "layer"])
def test_layerwise_state_is_the_weighted_sum_per_unit(zoo, level):
    members = zoo.all
    units = W.merge_units(zoo.served, level)
    assert sorted(k for u in units for k in u) == sorted(zoo.served.state)
    weights = torch.rand(len(units), len(members), generator=torch.Generator().manual_seed(7))
    weights = weights / weights.sum(1, keepdim=True)
    state = W.merged_state(members, units, weights)
    for u, keys in enumerate(units):
        for k in keys:
            expected = sum(weights[u, m] * members[m].state[k] for m in range(len(members)))
            assert torch.allclose(state[k], expected, atol=1e-6), k
    for m in range(len(members)):   # one-hot weights: exactly that member
        onehot = torch.nn.functional.one_hot(torch.full((len(units),), m), len(members)).float()
        state = W.merged_state(members, units, onehot)
        assert all(torch.equal(state[k], members[m].state[k]) for k in state)


def test_layerwise_units_are_the_merge_plans_groups(zoo):
    groups = W.merge_units(zoo.served, "group")
    assert groups == [["stages.0.weight", "stages.0.bias"], ["head.weight", "head.bias"]]
    assert W.merge_units(zoo.served, "model") == [[*groups[0], *groups[1]]]
    # auto: the served version's own merge plan's level
    served = Member.build(line="main", version=1, kind="served", architecture=TINY, state=zoo.served.state,
                          merge_plan={"level": "layer", "units": {}})
    assert W.layerwise_level(served, W.WeightingParams())[0] == "layer"
    assert W.layerwise_level(zoo.served, W.WeightingParams())[0] == "group"


def test_layerwise_merges_weights_not_outputs(zoo):
    """Rows of a mixed batch are grouped by their dominant member and each group runs ONE merged model."""
    x = torch.cat([rows(A), rows(B, seed=1)])
    pred = Predictor(zoo, mode="layerwise", temperature=0.01).predict(x, data_type="tabular")
    assert pred.labels.tolist() == [0] * 16 + [1] * 16
    assert pred.weights[:16, 1].min() > 0.99 and pred.weights[16:, 2].min() > 0.99
    # even weights: the merged model's output, which is not the mean of the members' outputs
    served, ma, _ = zoo.all
    two = ZooSnapshot(served, (member("main.cz", 0, {"a": A, "b": B}, {"a": 0.6, "b": 0.6}, seed=6),))
    merged = Predictor(two, mode="layerwise", temperature=1e6).predict(x, data_type="tabular")
    assert torch.allclose(merged.weights, torch.full((32, 2), 0.5), atol=1e-4)
    model = TINY.build()
    model.load_state_dict({k: (served.state[k] + two.members[0].state[k]) / 2 for k in served.state})
    assert torch.allclose(merged.probabilities, torch.softmax(model(x), 1), atol=1e-5)
    blended = Predictor(two, mode="blend", temperature=1e6).predict(x, data_type="tabular")
    assert not torch.allclose(merged.probabilities, blended.probabilities, atol=1e-3)


def test_layerwise_leaves_out_members_of_another_architecture(zoo):
    wide = Architecture(family="custom", params={"factory": f"{__name__}:tiny", "width": 4})
    compact = member("main.cw", 0, {"a": A}, {"a": 0.99}, arch=wide, seed=8)
    snap = ZooSnapshot(zoo.served, (compact, *zoo.members))
    x = rows(A)
    routed = Predictor(snap, mode="route").predict(x, data_type="tabular")
    assert routed.weights[:, 1].eq(1).all()                       # the compact member wins the route
    merged = Predictor(snap, mode="layerwise", temperature=0.01).predict(x, data_type="tabular")
    assert merged.weights[:, 1].eq(0).all() and merged.weights[:, 2].min() > 0.99
    assert torch.allclose(merged.weights.sum(1), torch.ones(len(x)), atol=1e-5)


def test_params_are_checked():
    with pytest.raises(ValueError):
        W.WeightingParams(temperature=0)
    with pytest.raises(ValueError):
        W.WeightingParams(level="row")


def test_a_fingerprint_in_another_feature_space_is_refused_at_build():
    with pytest.raises(ValueError, match="not in this model's 2 features"):
        Member.build(line="main.c9", version=1, kind="member", architecture=TINY, state=TINY.build().state_dict(),
                     fingerprints={"a": fingerprint(A, dims=4)})


def test_layerwise_never_changes_the_models_concurrent_requests_run(zoo):
    """Each merge runs in a model of its own: the served model's tensors stay as they are while layer-wise
    requests run beside served ones (a request thread per mode, as an HTTP server has)."""
    import sys
    import threading

    x = torch.cat([rows(A, n=2000), rows(B, n=2000, seed=1)])
    expected = Predictor(zoo, mode="served").predict(x, data_type="tabular").probabilities
    before = {k: t.clone() for k, t in zoo.served.state.items()}
    bad, stop = [], threading.Event()

    def layerwise():
        while not stop.is_set():
            Predictor(zoo, mode="layerwise", temperature=1.0).predict(x, data_type="tabular")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)      # switch threads often: a swapped parameter would be seen
    threads = [threading.Thread(target=layerwise) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for _ in range(200):
            got = Predictor(zoo, mode="served").predict(x, data_type="tabular").probabilities
            bad += [] if torch.equal(got, expected) else [got]
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    assert not bad and all(torch.equal(before[k], t) for k, t in zoo.served.state.items())


def test_inputs_the_served_model_cannot_take_are_refused_in_words():
    from daemon.serve.predictor import InputError

    mlp = Architecture(family="tabular_mlp", params={"in_features": 2, "num_classes": 3})
    p = Predictor(ZooSnapshot(Member.build(line="main", version=1, kind="served", architecture=mlp,
                                           state=mlp.build().state_dict())))
    assert p.predict(torch.zeros(0, 2)).probabilities.shape == (0, 3)
    for bad, why in ((torch.zeros(2, 3), "3 features"), (torch.full((2, 2), float("nan")), "NaN"),
                     (torch.zeros(2, 2, dtype=torch.int64), "int64"), (torch.zeros(2), "rank")):
        with pytest.raises(InputError, match=why):
            p.predict(bad)
    with pytest.raises(InputError, match="takes 'tabular'"):
        p.predict(torch.zeros(2, 2), data_type="image")
    with pytest.raises(ValueError, match="mode 'best'"):
        p.predict(torch.zeros(2, 2), mode="best")


def test_layerwise_of_a_built_in_family_runs_the_merged_weights():
    """Built-in families merge into a model built on the meta device that takes the merged tensors."""
    mlp = Architecture(family="tabular_mlp", params={"in_features": 2, "num_classes": 3, "width": 4})
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(mlp.build().state_dict())
    served, other = (Member.build(line=line, version=1, kind=kind, architecture=mlp, state=s)
                     for line, kind, s in (("main", "served", states[0]), ("main.c1", "member", states[1])))
    x = rows(A, n=8)
    got = Predictor(ZooSnapshot(served, (other,)), mode="layerwise").predict(x, data_type="tabular")
    assert torch.allclose(got.weights, torch.full((8, 2), 0.5))      # no evidence: equal weights
    model = mlp.build().eval()
    model.load_state_dict({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    with torch.no_grad():
        assert torch.allclose(got.probabilities, torch.softmax(model(x), 1), atol=1e-5)
