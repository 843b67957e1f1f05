from daemon.gate import gate


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
