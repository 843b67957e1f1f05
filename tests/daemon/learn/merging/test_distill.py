"""Bidirectional ensemble distillation moves students toward their teachers."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.merging.distill import (CongruentDistillation, KnowledgeDistillation, distill_into, ensemble_probs,
                                          hinton_loss, kd_kl)
from daemon.learn.training import fit


def mlp(hidden, seed, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


def test_hinton_loss_matches_the_formula():
    z_s = torch.tensor([[1.0, 0.0, -1.0]])
    z_t = torch.tensor([[0.0, 2.0, 0.0]])
    y = torch.tensor([1])
    T = 2.0
    p_t = F.softmax(z_t / T, -1)
    p_s = F.softmax(z_s / T, -1)
    kl = float((p_t * (p_t.log() - p_s.log())).sum())
    ce = float(-F.log_softmax(z_s, -1)[0, 1])
    assert kd_kl(z_s, p_t, T).item() == pytest.approx(kl, rel=1e-6)
    assert hinton_loss(z_s, y, p_t, T, 0.3, 0.7).item() == pytest.approx(0.3 * ce + 0.7 * T * T * kl, rel=1e-6)


def test_ensemble_teacher_is_the_mean_of_tempered_softmaxes():
    a, b = mlp(8, 1), mlp(5, 2)
    x, _ = data(10)
    expected = (F.softmax(a(x) / 3.0, -1) + F.softmax(b(x) / 3.0, -1)) / 2
    assert torch.allclose(ensemble_probs([a, b], x, 3.0), expected, atol=1e-6)


def test_distillation_moves_served_and_children_toward_their_teachers():
    x, y = data()
    served = mlp(16, 0)
    children = [mlp(32, 1), mlp(8, 2)]           # other architectures than the served model
    for c in children:                           # confident teachers: far from the untrained student
        fit(c, x, y, epochs=15, lr=1e-2, generator=torch.Generator().manual_seed(1))
    child_before = [{k: v.clone() for k, v in c.state_dict().items()} for c in children]
    report = distill_into(served, children, x, y, temperature=4.0, alpha=0.0, beta=1.0, epochs=4, lr=2e-2,
                          batch_size=32, generator=torch.Generator().manual_seed(0))
    assert report.served_kl_after < 0.2 * report.served_kl_before
    assert all(a < 0.5 * b for a, b in zip(report.child_kl_after, report.child_kl_before))
    assert all(not torch.equal(c.state_dict()[k], before[k]) for c, before in zip(children, child_before)
               for k in before)
    assert not served.training and not any(c.training for c in children)
    d = report.to_dict()
    assert d["method"] == "distill" and d["samples"] == 192 and len(d["child_kl_after"]) == 2


def test_one_way_mode():
    x, y = data(96)
    served, children = mlp(16, 0), [mlp(16, 3), mlp(16, 4)]
    frozen = [{k: v.clone() for k, v in c.state_dict().items()} for c in children]
    report = distill_into(served, children, x, y, epochs=1, child_epochs=0,
                          generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(c.state_dict()[k], f[k]) for c, f in zip(children, frozen) for k in f)
    assert all(math.isnan(v) for v in report.child_loss)
    report = distill_into(served, children, x, y, epochs=1, generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in report.child_loss)


def test_children_learn_back_on_the_same_batches_and_teachers_are_restored():
    # children trained one after the other from one generator state see the mini-batches that
    # training them side by side (one permutation per epoch, shared) would give them
    x, y = data(96)
    served, twins = mlp(16, 0), [mlp(8, 3), mlp(8, 3)]
    served.train()
    gen = torch.Generator().manual_seed(5)
    distill_into(served, twins, x, y, epochs=1, child_epochs=2, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(twins[0].state_dict().values(), twins[1].state_dict().values()))
    after = torch.randperm(10, generator=gen)
    expected = torch.Generator().manual_seed(5)
    for _ in range(1 + 2):                               # one permutation per epoch, each direction
        torch.randperm(96, generator=expected)
    assert torch.equal(after, torch.randperm(10, generator=expected))
    assert all(p.requires_grad for p in served.parameters())
    with pytest.raises(ValueError, match="teacher"):
        KnowledgeDistillation([])


def test_rejects_mismatched_outputs():
    x, y = data(8)
    with pytest.raises(ValueError, match="same classes"):
        distill_into(mlp(4, 0, classes=4), [mlp(4, 1, classes=3)], x, y)
    with pytest.raises(ValueError, match="at least one child"):
        distill_into(mlp(4, 0), [], x, y)


def test_served_model_learns_a_slice_only_a_child_of_another_architecture_knows():
    from daemon.learn.training import accuracy

    x, y = data(400)
    old = y < 2                                   # slice the served model knows: classes 0, 1
    served = mlp(16, 0)
    fit(served, x[old], y[old], epochs=20, lr=1e-2, generator=torch.Generator().manual_seed(0))
    child = mlp(48, 5)                            # wider: its weights cannot be merged by task vectors
    fit(child, x, y, epochs=20, lr=1e-2, generator=torch.Generator().manual_seed(1))
    new = ~old
    before_new = accuracy(served, x[new], y[new])
    # labels unused (alpha 0): everything the served model learns about classes 2, 3 comes from the child
    distill_into(served, [child], x, y, temperature=2.0, alpha=0.0, beta=1.0, epochs=10, lr=1e-2,
                 child_epochs=0, generator=torch.Generator().manual_seed(2))
    assert before_new < 0.1
    assert accuracy(served, x[new], y[new]) > 0.6
    assert accuracy(served, x[old], y[old]) > 0.8


# --- positive-congruent consolidation ----------------------------------------------------------------------
def test_congruent_distillation_is_the_formula_and_only_counts_rows_the_old_model_gets_right():
    x, y = data(12)
    old, new = mlp(8, 1), mlp(8, 2)
    T, w = 2.0, 0.7
    terms = CongruentDistillation(old, w, temperature=T, label_smoothing=0.1)(new, x, y)
    z_old, z_new = old(x).detach(), new(x)
    right = (z_old.argmax(1) == y).float()
    assert 0 < right.sum() < len(y)                               # both kinds of row in the batch
    p_old = F.softmax(z_old / T, -1)
    kl = (p_old * (p_old.log() - F.log_softmax(z_new / T, -1))).sum(1)
    ce = F.cross_entropy(z_new, y, label_smoothing=0.1)
    assert terms["congruence"].item() == pytest.approx(((right * kl).mean() * T * T).item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((ce + w * (right * kl).mean() * T * T).item(), rel=1e-5)
    # an old model wrong on every row constrains nothing: plain (smoothed) cross-entropy
    wrong = (z_old.argmax(1) + 1) % 4
    terms = CongruentDistillation(old, w, temperature=T, label_smoothing=0.1)(new, x, wrong)
    assert terms["congruence"].item() == 0
    assert terms["total"].item() == pytest.approx(F.cross_entropy(z_new, wrong, label_smoothing=0.1).item(), rel=1e-6)


def test_congruent_consolidation_loses_fewer_of_the_rows_the_old_model_got_right():
    # the old model learned the task; the new one is trained on a relabelled half of it (rows whose
    # label moved), as an update that must change some predictions: with congruence it keeps more of
    # the old model's right answers on the rows whose label did not move
    x, y = data(384, seed=3)
    old = mlp(32, 0)
    fit(old, x, y, epochs=30, lr=1e-2, generator=torch.Generator().manual_seed(0))
    moved = x[:, 2] > 0.8
    y_new = torch.where(moved, (y + 1) % 4, y)
    old_right = (old(x).argmax(1) == y) & ~moved
    before = {k: v.clone() for k, v in old.state_dict().items()}

    def lost(weight: float) -> int:
        new = mlp(32, 0)
        new.load_state_dict(old.state_dict())
        loss = CongruentDistillation(old, weight) if weight else None
        fit(new, x, y_new, epochs=10, lr=1e-2, loss=loss, generator=torch.Generator().manual_seed(1))
        return int((old_right & (new(x).argmax(1) != y)).sum())

    with_congruence, without = lost(1.0), lost(0.0)
    assert with_congruence < without, (with_congruence, without)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())   # the teacher is not trained
    with pytest.raises(ValueError):
        CongruentDistillation(old, -1.0)
