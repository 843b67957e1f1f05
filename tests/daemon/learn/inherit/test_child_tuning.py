"""Child-Tuning gradient masks: the fraction kept, frozen entries unchanged, 1/p scaling."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from daemon.learn.inherit.child_tuning import (BernoulliMask, TaskDrivenMask, child_tuning_hook,
                                               fisher_information, fisher_mask)
from daemon.learn.models import TabularMLP
from daemon.learn.training import fit


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def model(seed=0):
    torch.manual_seed(seed)
    return TabularMLP(in_features=10, num_classes=4, width=8)


def test_fisher_is_the_mean_squared_gradient():
    net = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    fisher = fisher_information(net, x, y, batch_size=2)
    assert net.weight.grad is None                      # grads left cleared
    grads = []
    for idx in (slice(0, 2), slice(2, 4)):
        net.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        grads.append(net.weight.grad.clone() ** 2)
    assert torch.allclose(fisher["weight"], (grads[0] + grads[1]) / 2)


def test_fisher_mask_keeps_exactly_the_top_fraction():
    fisher = {"stages.0.weight": torch.tensor([[5.0, 1.0], [0.5, 4.0]]), "stages.0.bias": torch.tensor([3.0, 0.1]),
              "head.weight": torch.tensor([[0.0, 0.0]])}
    masks = fisher_mask(fisher, 0.5)
    # 6 ranked elements, keep 3: the values 5, 4, 3 (one global ranking across tensors)
    assert masks["stages.0.weight"].tolist() == [[True, False], [False, True]]
    assert masks["stages.0.bias"].tolist() == [True, False]
    assert masks["head.weight"].all()                   # the head is always trained in full
    with pytest.raises(ValueError):
        fisher_mask(fisher, 0.0)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_task_driven_training_changes_only_the_masked_entries(p):
    net = model()
    x, y = data()
    hook = child_tuning_hook(net, x, y, mode="fisher", p=p)
    assert isinstance(hook, TaskDrivenMask)
    ranked = {n: m for n, m in hook.masks.items() if not n.startswith("head.")}
    kept = sum(int(m.sum()) for m in ranked.values()) / sum(m.numel() for m in ranked.values())
    assert kept == pytest.approx(p, abs=0.01)
    before = {n: t.detach().clone() for n, t in net.named_parameters()}
    fit(net, x, y, epochs=2, lr=1e-2, batch_size=16, hooks=[hook])
    for n, t in net.named_parameters():
        frozen = ~hook.masks[n]
        assert torch.equal(t[frozen], before[n][frozen]), f"{n}: a masked-out entry moved"
    moved = sum(int((t != before[n]).sum()) for n, t in net.named_parameters() if not n.startswith("head."))
    assert moved > 0


def test_bernoulli_mask_keeps_about_p_and_scales_by_one_over_p():
    p = 0.25
    net = nn.Linear(200, 100)
    net.weight.grad = torch.ones_like(net.weight)
    net.bias.grad = torch.ones_like(net.bias)
    BernoulliMask(p, generator=torch.Generator().manual_seed(0), always=()).before_step(net)
    g = net.weight.grad
    values = set(g.unique().tolist())
    assert values <= {0.0, 1 / p}                       # dropped, or kept and scaled by 1/p
    assert (g != 0).float().mean().item() == pytest.approx(p, abs=0.02)
    assert g.mean().item() == pytest.approx(1.0, abs=0.1)   # expected gradient unchanged


def test_bernoulli_mask_spares_the_always_trained_head_and_draws_fresh_masks():
    net = model()
    hook = BernoulliMask(0.5, generator=torch.Generator().manual_seed(1))
    draws = []
    for _ in range(2):
        for t in net.parameters():
            t.grad = torch.ones_like(t)
        hook.before_step(net)
        assert torch.equal(net.head.weight.grad, torch.ones_like(net.head.weight))
        draws.append(net.stages[0][0].weight.grad.clone())
    assert not torch.equal(draws[0], draws[1])          # a new mask every step


def test_hook_arguments_are_checked():
    with pytest.raises(ValueError):
        child_tuning_hook(model(), mode="fisher")        # task-driven needs the data
    with pytest.raises(ValueError):
        child_tuning_hook(model(), mode="magic")
    with pytest.raises(ValueError):
        BernoulliMask(1.5)
