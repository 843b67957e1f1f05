import math

from daemon.learn.continual import continual_metrics


def test_first_version_learns_every_slice_and_forgets_nothing():
    m = continual_metrics({"a": 0.9, "b": 0.7}, {}, fresh={"a", "b"})
    assert m.average_accuracy == 0.8 and m.learned == ["a", "b"]
    assert m.forgetting == {} and m.average_forgetting is None and m.bwt is None


def test_forgetting_is_measured_from_when_a_slice_was_learned():
    # a was learned at 0.95 and is 0.80 now; b was learned at 0.60 and improved (negative forgetting)
    m = continual_metrics({"a": 0.80, "b": 0.70, "c": 0.90}, {"a": 0.95, "b": 0.60}, fresh={"c"})
    assert m.learned == ["c"]
    assert m.forgetting == {"a": 0.15, "b": -0.1}
    assert m.average_forgetting == 0.025 and m.bwt == -0.025
    assert m.average_accuracy == 0.8


def test_a_slice_learned_again_counts_as_fresh_and_nan_slices_are_left_out():
    m = continual_metrics({"a": 0.5, "b": math.nan}, {"a": 0.9}, fresh={"a", "b"})
    assert m.forgetting == {} and m.learned == ["a"] and m.accuracy == {"a": 0.5}
    record = m.record()
    assert set(record) == {"average_accuracy", "average_forgetting", "bwt", "forgetting", "learned"}
