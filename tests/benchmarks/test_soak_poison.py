"""The soak's poison schedule: a known share, spread out, decided up front (the bench waits for
exactly the valid batches and audits exactly the poison ones)."""

from benchmarks.soak import _is_poison


def test_the_poison_share_is_exact_and_spread_out():
    marks = [_is_poison(i, 0.05) for i in range(1000)]
    assert sum(marks) == 50
    positions = [i for i, m in enumerate(marks) if m]
    assert all(b - a == 20 for a, b in zip(positions, positions[1:]))


def test_no_poison_by_default():
    assert not any(_is_poison(i, 0.0) for i in range(1000))
