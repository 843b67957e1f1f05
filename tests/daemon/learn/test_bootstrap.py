"""The bootstrap rule of daemon/learn/bootstrap.py: minimums, accuracy, cap, and a pause."""

from daemon.learn.bootstrap import BootstrapRule

RULE = BootstrapRule(min_batches=8, min_rows=400, accuracy=0.8)


def _never():
    raise AssertionError("held-out accuracy measured before the minimums")


def test_waits_for_batches_or_rows_whichever_comes_first_without_measuring():
    v = RULE.verdict(3, 150, _never)
    assert not v.done and "3/8 batches, 150/400 rows" in v.reason
    assert RULE.verdict(8, 160, lambda: {"a": 0.9}).done         # eight small batches
    assert RULE.verdict(3, 480, lambda: {"a": 0.9}).done         # three large ones


def test_publishes_only_once_every_slice_is_good_enough():
    v = RULE.verdict(8, 400, lambda: {"a": 0.95, "b": 0.6})
    assert not v.done and "0.600 on b" in v.reason and "16 batches or 800 rows" in v.reason
    assert RULE.verdict(9, 450, lambda: {"a": 0.95, "b": 0.8}).done


def test_at_twice_either_minimum_it_is_served_anyway_and_says_so():
    for batches, rows in ((16, 320), (5, 800)):
        v = RULE.verdict(batches, rows, lambda: {"a": 0.5})
        assert v.done and v.capped and "the cap" in v.reason
    assert not RULE.verdict(15, 799, lambda: {"a": 0.5}).done


def test_a_pause_waives_the_minimums_not_the_accuracy_and_has_no_cap():
    assert RULE.verdict(2, 60, lambda: {"a": 0.9}, idle=True).done
    assert not RULE.verdict(2, 60, lambda: {"a": 0.7}, idle=True).done
    assert not RULE.verdict(20, 1000, lambda: {"a": 0.7}, idle=True).done   # the batches' cap decides that
    assert not RULE.verdict(2, 60, lambda: {}, idle=True).done              # no held-out rows: nothing to judge
