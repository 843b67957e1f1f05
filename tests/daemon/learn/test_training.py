"""The one training loop: what it consumes, what its plugins see, and what it optimises."""

from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.training import (CrossEntropy, EpochCallback, Hook, Loss, autocast, compute_dtype, fit,
                                   frozen, predict_logits, set_precision)


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] > 0).long()


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


def test_one_permutation_per_epoch_is_all_the_randomness_it_draws():
    x, y = data()
    gen = torch.Generator().manual_seed(3)
    fit(net(), x, y, epochs=3, lr=1e-2, batch_size=16, generator=gen)
    expected = torch.Generator().manual_seed(3)
    for _ in range(3):
        torch.randperm(len(x), generator=expected)
    assert torch.equal(torch.randperm(7, generator=gen), torch.randperm(7, generator=expected))


def test_same_generator_same_model():
    x, y = data()
    a, b = net(), net()
    fit(a, x, y, epochs=2, lr=1e-2, batch_size=16, generator=torch.Generator().manual_seed(1))
    fit(b, x, y, epochs=2, lr=1e-2, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_history_hooks_and_modes():
    x, y = data()
    model = net()
    steps, epochs = [], []

    class Count(Hook):
        def before_step(self, m):
            assert m.training and all(p.grad is not None for p in m.parameters())
            steps.append(1)

    history = fit(model, x, y, epochs=2, lr=1e-2, batch_size=16,
                  hooks=[Count(), EpochCallback(lambda e, m, losses: epochs.append((e, m.training, losses)))])
    assert len(steps) == 2 * 3                        # 40 rows in batches of 16: 3 steps per epoch
    assert [(e, training) for e, training, _ in epochs] == [(1, False), (2, False)]
    assert [losses for _, _, losses in epochs] == history and set(history[0]) == {"total"}
    assert history[1]["total"] < history[0]["total"] and not model.training


def test_the_mean_loss_is_per_sample():
    x, y = data(10)
    model = net()
    with autocast(torch.device("cpu")):   # in the precision fit computes in
        before = F.cross_entropy(model(x), y).item()
    history = fit(model, x, y, epochs=1, lr=0.0, batch_size=10)   # lr 0: the loss seen is the loss before
    assert history[0]["total"] == pytest.approx(before)


def test_zero_epochs_train_nothing():
    x, y = data()
    model = net()
    before = [p.clone() for p in model.parameters()]
    assert fit(model, x, y, epochs=0, lr=1e-2) == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError):
        fit(model, x, y, epochs=-1, lr=1e-2)


def test_a_loss_trains_its_own_parameters_and_param_groups():
    x, y = data()

    class Scaled(Loss):
        """CE on scaled logits: one parameter in the default group, one in a group of its own."""

        def __init__(self):
            self.scale = nn.Parameter(torch.ones(()))
            self.shift = nn.Parameter(torch.zeros(2))
            self.bound = False

        @contextmanager
        def bind(self, model, x):
            self.bound = True
            yield [self.scale, {"params": [self.shift], "lr": 0.0}]
            self.bound = False

        def __call__(self, model, x, y):
            assert self.bound
            return {"total": F.cross_entropy(model(x) * self.scale + self.shift, y), "scale": self.scale * 1}

    loss = Scaled()
    history = fit(net(), x, y, loss=loss, epochs=2, lr=1e-1, batch_size=16)
    assert set(history[0]) == {"total", "scale"} and not loss.bound
    assert loss.scale.item() != 1.0                   # trained at the loop's lr
    assert torch.equal(loss.shift.detach(), torch.zeros(2))   # its own group's lr 0


def test_cross_entropy_is_the_default_and_frozen_restores():
    x, y = data()
    a, b = net(), net()
    fit(a, x, y, epochs=1, lr=1e-2, generator=torch.Generator().manual_seed(0))
    fit(b, x, y, loss=CrossEntropy(), epochs=1, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    teacher = net()
    teacher.train()
    with frozen(teacher):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_label_smoothing_spreads_the_target_and_bounds_the_confidence_it_trains_towards():
    x, y = data()
    model = net()
    logits = model(x)
    eps, classes = 0.2, 2
    target = torch.full_like(logits, eps / classes).scatter_(1, y[:, None], 1 - eps + eps / classes)
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(CrossEntropy(eps)(model, x, y)["total"], expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(1.0)
    # trained to convergence on separable rows: plain CE drives the confidence to 1, smoothing to 1 - eps/2
    plain, smooth = net(), net()
    for model, loss in ((plain, CrossEntropy()), (smooth, CrossEntropy(0.5))):
        fit(model, x, y, loss=loss, epochs=300, lr=1e-2, batch_size=40, generator=torch.Generator().manual_seed(0))
    confidence = {name: m(x).softmax(1).max(1).values.mean().item() for name, m in (("plain", plain), ("smooth", smooth))}
    assert confidence["plain"] > 0.95
    assert 0.65 < confidence["smooth"] < 0.85  # 0.75 at the optimum


def test_early_stopping_ends_fit_after_patience_and_keeps_the_best_weights():
    from daemon.learn.training import EarlyStopping

    model = torch.nn.Linear(2, 2)
    x, y = torch.randn(64, 2), torch.randint(2, (64,))
    scores = iter([0.5, 0.7, 0.9, 0.8, 0.85, 0.95, 0.99])   # start, then one per epoch
    seen = []

    def score(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    stopper = EarlyStopping(score, patience=2).start(model)
    history = fit(model, x, y, epochs=10, lr=0.1, hooks=(stopper,), generator=torch.Generator().manual_seed(0))
    assert len(history) == 4 and stopper.best_epoch == 2 and stopper.scores == [0.5, 0.7, 0.9, 0.8, 0.85]
    stopper.restore_best(model)
    assert all(torch.equal(model.state_dict()[k], seen[2][k]) for k in seen[2])


@pytest.fixture
def precision():
    """Set the process's precision for one test; ``auto`` again after it (what every engine sets)."""
    yield set_precision
    set_precision("auto")


def test_precision_decides_what_autocast_computes_in(precision):
    layer, x, cpu = nn.Linear(5, 2), torch.randn(3, 5), torch.device("cpu")
    precision("float32")
    with autocast(cpu):
        assert layer(x).dtype == torch.float32
    precision("bfloat16")
    assert compute_dtype(cpu) == torch.bfloat16
    with autocast(cpu):
        assert layer(x).dtype == torch.bfloat16
    precision("auto")   # bf16 on CUDA; the CPU stays float32 unless asked
    assert compute_dtype(cpu) == torch.float32 and compute_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16"):
        precision("fp16")


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_weights_stay_float32_and_a_run_is_reproducible_in_either_precision(precision, name):
    precision(name)
    x, y = data()
    a, b = net(), net()
    for model in (a, b):
        fit(model, x, y, epochs=2, lr=1e-2, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert predict_logits(a, x).dtype == torch.float32
