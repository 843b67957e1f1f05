"""The feature-KL detector: exact on known Gaussians, direction, separation, calibration (the
protocol every detector follows is checked in test_conformance.py)."""

import math

import torch

from daemon.learn.drift import FeatureKL, calibrate_threshold, gaussian_kl


def test_gaussian_kl_matches_closed_form():
    # KL(N(1, 4) || N(0, 1)) = 0.5 * (4 + 1 - 1 - ln 4) per dimension
    d = torch.float64
    kl = gaussian_kl(torch.tensor([1.0, 1.0], dtype=d), torch.tensor([4.0, 4.0], dtype=d),
                     torch.zeros(2, dtype=d), torch.ones(2, dtype=d))
    assert math.isclose(kl, 2 * 0.5 * (4 + 1 - 1 - math.log(4)), rel_tol=1e-9)
    # direction matters: KL(N(0,1) || N(1,4)) differs
    reverse = gaussian_kl(torch.zeros(2, dtype=d), torch.ones(2, dtype=d), torch.tensor([1.0, 1.0], dtype=d),
                          torch.tensor([4.0, 4.0], dtype=d))
    assert math.isclose(reverse, 2 * 0.5 * (0.25 + 0.25 - 1 + math.log(4)), rel_tol=1e-9)


def test_fingerprint_axes_are_principal_components():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4000, 3, generator=gen) * torch.tensor([5.0, 1.0, 0.1])
    fp = FeatureKL.fit(f, components=2)
    assert fp.basis.shape == (3, 2)
    assert abs(abs(float(fp.basis[0, 0])) - 1.0) < 1e-2   # first axis = the wide dimension
    assert abs(float(fp.var[0]) - 25.0) < 1.5 and abs(float(fp.var[1]) - 1.0) < 0.1


def test_same_distribution_is_near_zero_and_shift_is_large():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(2000, 16, generator=gen)
    fp = FeatureKL.fit(ref)
    same = fp.score(torch.randn(500, 16, generator=gen))
    shifted = fp.score(torch.randn(500, 16, generator=gen) + 2.0)
    assert same < 0.1
    assert shifted > 5.0


def test_calibrated_threshold_bounds_false_alarms():
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(1000, 16, generator=gen)
    threshold = calibrate_threshold(ref, batch_size=100, false_alarm_rate=0.05)
    fp = FeatureKL.fit(ref)
    alarms = sum(fp.score(torch.randn(100, 16, generator=gen)) >= threshold for _ in range(200))
    assert threshold > 0
    assert alarms <= 30  # ~5% expected; generous bound for 200 trials
