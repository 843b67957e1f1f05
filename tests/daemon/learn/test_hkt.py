"""Hereditary Knowledge Transfer: the Genetic Attention formula, alignment across families, what
trains, and that the child runs alone afterwards."""

import math

import pytest
import torch
from torch import nn

from daemon.learn.families import Architecture, ImageCNN, SequenceGRU, TabularMLP, parameter_count
from daemon.learn.hkt import (Align, HKTSettings, HKTTrainer, compact_architecture, genetic_attention,
                        inherit_for_spawn, inherit_weights, known_classes, resolve_stages, spawn_child,
                        train_hkt)


# --------------------------------------------------------------------------- genetic attention

def test_genetic_attention_on_hand_built_vectors():
    # C = 4, so sqrt(C) = 2. Sample 0: <q,P> = 2*1 + 0 + 0 + 0 = 2 → s = sigmoid(1).
    # Sample 1: orthogonal, <q,P> = 0 → s = 0.5.
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    z, s, ga = genetic_attention(q, p, alpha=0.6)
    s0 = 1 / (1 + math.exp(-1.0))
    assert s.shape == (2, 1)
    assert s[0, 0].item() == pytest.approx(s0)
    assert s[1, 0].item() == pytest.approx(0.5)
    # GA = s*P + (1-s)*q ; z = q + 0.6*(P - GA)
    ga0 = s0 * p[0] + (1 - s0) * q[0]
    assert torch.allclose(ga[0], ga0)
    assert torch.allclose(z[0], q[0] + 0.6 * (p[0] - ga0))
    # sample 1 worked by hand: GA = [0.5, 1, 0, 0]; P - GA = [-0.5, 1, 0, 0]; z = [0.7, 0.6, 0, 0]
    assert torch.allclose(ga[1], torch.tensor([0.5, 1.0, 0.0, 0.0]))
    assert torch.allclose(z[1], torch.tensor([0.7, 0.6, 0.0, 0.0]))


def test_genetic_attention_gates_per_position_for_maps_and_sequences():
    q, p = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    z, s, _ = genetic_attention(q, p)
    assert s.shape == (3, 1, 4, 4) and z.shape == q.shape
    expected = torch.sigmoid((q * p).sum(1, keepdim=True) / math.sqrt(5))
    assert torch.allclose(s, expected)
    q, p = torch.randn(2, 7, 6), torch.randn(2, 7, 6)   # (N, T, C): channels last
    _, s, _ = genetic_attention(q, p)
    assert s.shape == (2, 7, 1)


def test_genetic_attention_limits_and_shape_check():
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    z, _, _ = genetic_attention(q, p, alpha=0.0)
    assert torch.equal(z, q)                       # alpha 0: nothing inherited
    z, _, _ = genetic_attention(q, q.clone())
    assert torch.allclose(z, q)                     # identical features: the mix is the identity
    with pytest.raises(ValueError):
        genetic_attention(torch.randn(2, 3), torch.randn(2, 4))


# --------------------------------------------------------------------------- transfer / alignment

@pytest.mark.parametrize("src,dst", [((16,), (8,)), ((16, 14, 14), (8, 14, 14)), ((16, 7, 7), (8, 4, 4)),
                                     ((8, 4, 4), (16, 7, 7)), ((10, 32), (5, 16)), ((16, 7, 7), (32,))])
def test_align_maps_any_stage_shape_to_the_target(src, dst):
    align = Align(src, dst)
    out = align(torch.randn(3, *src))
    assert tuple(out.shape) == (3, *dst)


def _models():
    """Parent + half-width child of every family, and an input batch for each."""
    torch.manual_seed(0)
    return [
        (ImageCNN(image_size=12, width=8), ImageCNN(image_size=12, width=4), torch.rand(6, 12, 12)),
        (SequenceGRU(vocab_size=20, width=16, embed_dim=8), SequenceGRU(vocab_size=20, width=8, embed_dim=8),
         torch.randint(0, 20, (6, 5))),
        (TabularMLP(in_features=10, width=16), TabularMLP(in_features=10, width=8), torch.randn(6, 10)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["image_cnn", "sequence_gru", "tabular_mlp"])
def test_alignment_shapes_for_every_stage_of_every_family(index):
    parent, child, x = _models()[index]
    n = len(parent.stages)
    trainer = HKTTrainer(parent, child, x, HKTSettings(stages=tuple(range(n))))
    p_outs, c_outs = parent.stage_outputs(x), child.stage_outputs(x)
    for k in range(n):
        assert trainer.down[str(k)](p_outs[k]).shape == c_outs[k].shape
        assert trainer.up[str(k)](c_outs[k]).shape == p_outs[k].shape
    terms = trainer.losses(x, torch.randint(0, 10, (len(x),)))
    assert set(terms) == {"child", "mix", "reverse", "total"}
    assert all(torch.isfinite(v) for v in terms.values())


class UserModel(nn.Module):
    """A user model that only follows the convention: ``stages`` + ``head`` (no stage_outputs)."""

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
    child = spawn_child(parent, child_arch, x, y, epochs=1, lr=1e-2, batch_size=16,
                        settings=HKTSettings(stages=(0, 1)))
    assert isinstance(child, UserModel) and child.head.in_features == 6
    assert child(x).shape == (32, 3)


def test_stage_indices_are_checked():
    parent, child, _ = _models()[2]
    assert resolve_stages(parent, child, None) == (1,)          # default: the penultimate stage
    assert resolve_stages(parent, child, (-2, 1)) == (0, 1)
    with pytest.raises(ValueError):
        resolve_stages(parent, child, (5,))
    with pytest.raises(ValueError):
        resolve_stages(parent, ImageCNN(), None)                # stages are paired by index


# --------------------------------------------------------------------------- training

def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("index", [0, 1, 2], ids=["image_cnn", "sequence_gru", "tabular_mlp"])
def test_only_the_child_trains_and_the_parent_is_restored(index):
    parent, child, x = _models()[index]
    y = torch.randint(0, 10, (len(x),))
    parent.train()
    before_parent, before_child = _params(parent), _params(child)
    flags = [p.requires_grad for p in parent.parameters()]
    history = train_hkt(parent, child, x, y, epochs=2, lr=1e-2, batch_size=3,
                        settings=HKTSettings(stages=tuple(range(len(parent.stages))), gates=True))
    assert len(history) == 2 and {"child", "mix", "reverse", "total"} <= set(history[0])
    for n, p in parent.named_parameters():
        assert torch.equal(p, before_parent[n]), f"parent parameter {n} changed"
        assert p.grad is None
    assert [p.requires_grad for p in parent.parameters()] == flags and parent.training
    changed = [n for n, p in child.named_parameters() if not torch.equal(p, before_child[n])]
    assert changed, "the child did not train"
    # nothing of the trainer (projections, gates) was added to the child
    assert set(dict(child.named_parameters())) == set(before_child)


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
    auto = HKTSettings(inherit="auto")
    names = inherit_for_spawn(parent, TabularMLP(in_features=10, width=4, num_classes=4), x, new_classes, auto)
    assert names and not any(n.startswith("head.") for n in names)
    names = inherit_for_spawn(parent, TabularMLP(in_features=10, width=4, num_classes=4), x, old_classes, auto)
    assert "head.bias" in names
    assert inherit_for_spawn(parent, TabularMLP(in_features=10, width=4), x, old_classes,
                             HKTSettings(inherit="none")) == []


def test_copy_with_auto_inheritance_leaves_an_unknown_class_head_fresh():
    torch.manual_seed(0)
    parent = TabularMLP(in_features=10, width=8, num_classes=4)
    with torch.no_grad():                           # a parent that always answers class 0
        parent.head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    x, y = torch.randn(12, 10), torch.tensor([2, 3] * 6)
    child = spawn_child(parent, None, x, y, epochs=0, lr=1e-3, method="copy",
                        settings=HKTSettings(inherit="auto"))
    assert torch.equal(child.stages[0][0].weight, parent.stages[0][0].weight)
    assert not torch.equal(child.head.bias, parent.head.bias)
    plain = spawn_child(parent, None, x, y, epochs=0, lr=1e-3, method="copy")
    assert torch.equal(plain.head.bias, parent.head.bias)


def test_settings_are_validated():
    with pytest.raises(ValueError):
        HKTSettings(weights=(1.0, 1.0))
    with pytest.raises(ValueError):
        HKTSettings(inherit="everything")
    with pytest.raises(ValueError):
        HKTSettings(stages=())
    with pytest.raises(ValueError):
        compact_architecture(Architecture(family="custom", params={"factory": "x.y:z"}), 0.5)
