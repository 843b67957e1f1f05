"""Spawning children: compact children by HKT run alone, copy and scratch, the weight inheritance
a compact child starts from, and user models that follow the staged-model contract."""

import pytest
import torch
from torch import nn

from daemon.learn.inherit.hkt import Align, resolve_stages
from daemon.learn.inherit.spawn import (compact_architecture, fresh_like, inherit_for_spawn, inherit_weights,
                                        known_classes, spawn_child)
from daemon.learn.models import Architecture, SequenceGRU, TabularMLP, parameter_count


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class UserModel(nn.Module):
    """A user model that only follows the convention: ``stages`` + ``head`` (no stage_outputs), and
    names the stages HKT mixes at (``hkt_stages``)."""

    hkt_stages = (0, 1)

    def __init__(self, width: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(5, width), nn.Tanh()),
                                     nn.Sequential(nn.Linear(width, width), nn.Tanh())])
        self.head = nn.Linear(width, num_classes)

    def features(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x):
        return self.head(self.features(x))


def user_factory(width: int = 12, num_classes: int = 3) -> nn.Module:
    return UserModel(width, num_classes)


def test_user_model_with_stages_gets_a_compact_child_by_hkt():
    arch = Architecture(family="custom", params={"factory": f"{__name__}:user_factory", "width": 12})
    torch.manual_seed(0)
    parent = arch.build()
    child_arch = compact_architecture(arch, 0.5)
    assert child_arch.params["width"] == 6
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    child = spawn_child(parent, child_arch, x, y, epochs=1, lr=1e-2, batch_size=16)
    assert isinstance(child, UserModel) and child.head.in_features == 6
    assert resolve_stages(parent, child, None) == (0, 1)          # the model's own hkt_stages
    assert child(x).shape == (32, 3)


def test_spawned_child_runs_alone_and_is_compact():
    arch = Architecture(family="image_cnn", params={"image_size": 12, "width": 8})
    torch.manual_seed(0)
    parent = arch.build()
    x, y = torch.rand(24, 12, 12), torch.randint(0, 10, (24,))
    child = spawn_child(parent, compact_architecture(arch, 0.5), x, y, epochs=1, lr=1e-3, batch_size=8)
    assert parameter_count(child) < parameter_count(parent) / 2
    assert not any(isinstance(m, Align) for m in child.modules())
    state = {k: v.clone() for k, v in child.state_dict().items()}
    del parent                                     # inference needs nothing of the parent
    fresh = compact_architecture(arch, 0.5).build()
    fresh.load_state_dict(state)
    fresh.eval()
    child.eval()
    assert torch.allclose(fresh(x), child(x))


def test_spawn_methods_copy_and_scratch():
    arch = Architecture(family="tabular_mlp", params={"in_features": 10, "width": 8})
    torch.manual_seed(0)
    parent = arch.build()
    x, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    before = _params(parent)
    copied = spawn_child(parent, None, x, y, epochs=0, lr=1e-3, method="copy")
    assert all(torch.equal(p, before[n]) for n, p in copied.named_parameters())
    scratch = spawn_child(parent, None, x, y, epochs=0, lr=1e-3, method="scratch")
    assert not torch.equal(scratch.head.weight, parent.head.weight)
    tuned = spawn_child(parent, None, x, y, epochs=1, lr=1e-2, method="copy", child_tuning="fisher",
                        child_tuning_p=0.2)
    assert any(not torch.equal(p, before[n]) for n, p in tuned.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in parent.named_parameters())
    with pytest.raises(ValueError):
        spawn_child(parent, None, x, y, epochs=1, lr=1e-3, method="clone")
    with pytest.raises(ValueError):
        spawn_child(parent, compact_architecture(arch, 0.5), x, y, epochs=1, lr=1e-3, method="copy")


def test_inherit_weights_takes_the_leading_channels():
    parent = SequenceGRU(vocab_size=20, width=8, embed_dim=4)
    child = SequenceGRU(vocab_size=20, width=4, embed_dim=4)
    names = inherit_weights(parent, child)
    assert "stages.0.weight" in names and "stages.1.gru.weight_hh_l0" in names
    assert not any(n.startswith("head.") for n in names)
    # GRU weights are three gate blocks stacked on dim 0: each block is sliced separately
    w_p, w_c = parent.stages[1].gru.weight_hh_l0, child.stages[1].gru.weight_hh_l0
    for g in range(3):
        assert torch.equal(w_c[4 * g:4 * g + 4], w_p[8 * g:8 * g + 4, :4])


def test_auto_inheritance_takes_the_head_only_when_the_parent_knows_the_classes():
    parent = TabularMLP(in_features=10, width=8, num_classes=4)
    with torch.no_grad():                           # a parent that always answers class 0
        parent.head.weight.zero_()
        parent.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    x = torch.randn(12, 10)
    new_classes, old_classes = torch.tensor([2, 3] * 6), torch.tensor([0] * 12)
    assert known_classes(parent, x, new_classes) == 0.0
    assert known_classes(parent, x, old_classes) == 1.0
    names = inherit_for_spawn(parent, TabularMLP(in_features=10, width=4, num_classes=4), x, new_classes)
    assert names and not any(n.startswith("head.") for n in names)
    names = inherit_for_spawn(parent, TabularMLP(in_features=10, width=4, num_classes=4), x, old_classes)
    assert "head.bias" in names


def test_a_same_size_start_by_inheritance_leaves_an_unknown_class_head_fresh():
    torch.manual_seed(0)
    parent = TabularMLP(in_features=10, width=8, num_classes=4)
    with torch.no_grad():                           # a parent that always answers class 0
        parent.head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    x, y = torch.randn(12, 10), torch.tensor([2, 3] * 6)
    child = fresh_like(parent)                      # what `filial bench hkt`'s copy:inherit=auto does
    inherit_for_spawn(parent, child, x, y)
    assert torch.equal(child.stages[0][0].weight, parent.stages[0][0].weight)
    assert not torch.equal(child.head.bias, parent.head.bias)
    plain = spawn_child(parent, None, x, y, epochs=0, lr=1e-3, method="copy")
    assert torch.equal(plain.head.bias, parent.head.bias)


def test_compact_architecture_needs_a_width():
    with pytest.raises(ValueError):
        compact_architecture(Architecture(family="custom", params={"factory": "x.y:z"}), 0.5)
