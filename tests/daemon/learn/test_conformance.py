"""What every registered merge method and every drift detector must do, whatever it computes.

A new method or detector joins these tests by being registered (``METHODS``, ``DETECTORS``); its
own hand-worked figures belong in its own test file.
"""

import json
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load, save

from daemon.learn.drift import DETECTORS, calibrate_threshold
from daemon.learn.merging.methods import METHODS
from daemon.learn.merging.plans import MergePlan, UnitPlan, apply_plan

# ---------------------------------------------------------------------------- merge methods

SHAPES = {"stages.0.weight": (4, 3), "stages.0.bias": (4,), "head.weight": (2, 4)}


def _base(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    state["steps"] = torch.tensor([3])                        # an integer buffer
    return state


def _merge(name, base, children, weights=None, **params):
    return apply_plan(MergePlan("model", {"model": UnitPlan(name, params)}), base, children, weights)


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def test_children_equal_to_the_base_merge_to_the_base(method):
    base = _base()
    for lam in (None, 2.0):
        params = {} if lam is None else {"lam": lam}
        merged = _merge(method, base, [dict(base), dict(base)], [1.0, 3.0], **params)
        assert all(torch.equal(merged[k], base[k]) for k in base)


def test_one_sparse_task_vector_passes_through_at_lambda_one(method):
    # one child whose task vector has a single non-zero entry per tensor: every method returns base + tau
    base = _base()
    child = {k: t.clone() for k, t in base.items()}
    for k in SHAPES:
        child[k].view(-1)[1] += 0.75
    merged = _merge(method, base, [child], lam=1.0)
    assert all(torch.allclose(merged[k], child[k], atol=1e-6) for k in SHAPES)
    assert torch.equal(merged["steps"], base["steps"])


def test_lambda_scales_the_merged_task_vector(method):
    base = _base()
    children = [{k: t + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
                 if t.is_floating_point() else t for k, t in base.items()} for i in range(3)]
    one = _merge(method, base, children, [1.0, 2.0, 1.0], lam=1.0)
    two = _merge(method, base, children, [1.0, 2.0, 1.0], lam=2.0)
    assert all(torch.allclose(two[k] - base[k], 2 * (one[k] - base[k]), atol=1e-5) for k in SHAPES)


def test_dtypes_buffers_and_inputs_are_kept(method):
    base = _base(dtype=torch.bfloat16)
    child = {k: (t + 1).to(t.dtype) for k, t in base.items()}
    snapshot = {k: t.clone() for k, t in child.items()}
    merged = _merge(method, base, [child])
    assert all(merged[k].dtype == base[k].dtype and merged[k].shape == base[k].shape for k in base)
    assert torch.equal(merged["steps"], base["steps"]) and merged["steps"] is not base["steps"]
    assert all(torch.equal(child[k], snapshot[k]) for k in child)


def test_parameters_are_typed_with_defaults_and_a_reference(method):
    m = METHODS[method]
    assert m.summary and m.reference
    assert "lam" in m.defaults and list(m.defaults)[-1] == "lam"
    assert m.params() == m.defaults
    unit = UnitPlan(method, {"lam": 0.25})
    assert UnitPlan.from_dict(json.loads(json.dumps(unit.to_dict()))) == unit
    with pytest.raises(ValueError, match="no parameter"):
        UnitPlan(method, {"nope": 1.0})
    with pytest.raises(ValidationError):
        UnitPlan(method, {"lam": "a lot"})
    with pytest.raises(ValidationError):
        UnitPlan(method, {"lam": math.inf})


def test_weights_and_children_are_validated(method):
    base = _base()
    child = {k: t.clone() for k, t in base.items()}
    with pytest.raises(ValueError, match="weights"):
        _merge(method, base, [child, child], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        _merge(method, base, [child], [-1.0])
    with pytest.raises(ValueError, match="positive sum"):
        _merge(method, base, [child], [0.0])
    with pytest.raises(ValueError, match="at least one child"):
        _merge(method, base, [])
    with pytest.raises(ValueError, match="keys and shapes"):
        _merge(method, base, [{**child, "head.weight": torch.zeros(3, 4)}])


# ---------------------------------------------------------------------------- drift detectors

@pytest.fixture(params=sorted(DETECTORS))
def detector(request):
    return DETECTORS[request.param]


def _features(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, 16)
    return torch.randn(n, 16, generator=g) * scales + shift


def test_a_detector_scores_its_reference_below_a_shifted_batch(detector):
    reference = _features(1000, 0)
    fitted = detector.fit(reference)
    own, same, shifted = fitted.score(reference), fitted.score(_features(100, 1)), fitted.score(_features(100, 2, 1.5))
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in (own, same, shifted))
    assert own < shifted and same < shifted
    assert own <= same + 1e-9                   # nothing is closer to the reference than itself


def test_a_detector_round_trips_through_checkpoint_tensors(detector):
    fitted = detector.fit(_features(500, 0))
    tensors = fitted.to_tensors("node.c1.fp")
    assert all(k.startswith("node.c1.fp.") for k in tensors)
    again = detector.from_tensors(load(save(tensors)), "node.c1.fp")   # as a checkpoint stores them
    batch = _features(100, 3, 0.5)
    assert again.score(batch) == fitted.score(batch)


def test_a_detector_calibrates_a_threshold(detector):
    reference = _features(600, 0)
    threshold = calibrate_threshold(reference, batch_size=100, false_alarm_rate=0.05, trials=50, detector=detector)
    assert math.isfinite(threshold) and threshold > 0
    assert detector.fit(reference).score(_features(100, 4, 1.5)) > threshold
