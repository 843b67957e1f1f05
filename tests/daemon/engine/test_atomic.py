"""Engine.process is all or nothing: a batch the learner raises on leaves no trace (tree, buffers,
counters, random state), so quarantining it (daemon/service/consume.py) leaves the same engine as
never having seen it."""

from __future__ import annotations

import copy

import pytest
import torch

from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from tests.helpers import digits_tabular


def _engine() -> Engine:
    return Engine(ModelSettings(family="tabular_mlp"),
                  LearnerSettings(bootstrap_batches=2, bootstrap_epochs=2, bootstrap_accuracy=0.01,
                                  accuracy_threshold=0.99, train_batch_size=16, child_epochs=2),
                  MergeSettings(), torch.device("cpu"))


def _batch(i: int, rows: int = 128, slice_name: str = "a", poison: bool = False) -> Batch:
    x, y = digits_tabular()
    lo = (i * rows) % (len(y) - rows)
    xb, yb = x[lo:lo + rows].clone(), y[lo:lo + rows].clone()
    if slice_name != "a":  # another slice: a strong feature shift, so the learner spawns a child
        xb = xb[:, torch.randperm(xb.shape[1], generator=torch.Generator().manual_seed(7))]
    if poison:  # a label the model has no class for: cross-entropy raises in the middle of training
        yb[-1] = 12
    return Batch(xb, yb, slice_name, "tabular", f"{slice_name}-{i}", BatchSource("t", 0, i))


def _state(engine: Engine):
    meta, tensors = engine.checkpoint()  # the metadata shares dicts with the live state: copy it
    return copy.deepcopy(meta), {k: v.clone() for k, v in tensors.items()}


def _timeless(meta):
    """The metadata without the children's creation times (two engines spawn them at different times)."""
    meta = copy.deepcopy(meta)
    for node in meta["tree"]["nodes"]:
        node.pop("created_at")
    return meta


def _same(a, b) -> bool:
    (meta_a, ten_a), (meta_b, ten_b) = a, b
    return _timeless(meta_a) == _timeless(meta_b) and ten_a.keys() == ten_b.keys() and all(torch.equal(ten_a[k], ten_b[k]) for k in ten_a)


def _fed(batches) -> Engine:
    engine = _engine()
    for b in batches:
        if engine.process(b).publish_bootstrap:
            engine.adopt_bootstrap(1)
    return engine


def test_a_failing_first_batch_leaves_no_model_behind():
    engine = _engine()
    with pytest.raises(IndexError):
        engine.process(_batch(0, poison=True))
    assert engine.architecture is None and engine.expected_shapes() == {}
    assert engine.counters.batches == 0
    assert _same(_state(engine), _state(_engine()))


def test_a_batch_failing_mid_training_is_undone_and_the_stream_goes_on_as_without_it():
    good = [_batch(i) for i in range(3)]
    engine, twin = _fed(good), _fed(good)
    before = _state(engine)
    for _ in range(2):  # the consume loop's retry fails the same way, and is undone the same way
        with pytest.raises(IndexError):
            engine.process(_batch(3, slice_name="b", poison=True))  # spawns a child, then fails training it
        assert _same(_state(engine), before)
    assert engine.status().children == twin.status().children
    following = [_batch(4, slice_name="b"), _batch(5)]
    for b in following:
        got, want = engine.process(b), twin.process(b)
        assert (got.action, got.child, got.accuracy, got.kl) == (want.action, want.child, want.accuracy, want.kl)
    assert _same(_state(engine), _state(twin))
