"""Hereditary Knowledge Transfer: the Genetic Attention formula, alignment across families, and
that training with the HKT loss moves only the child (the parent frozen and restored)."""

import math

import pytest
import torch

from daemon.learn.inherit.hkt import Align, HKTLoss, genetic_attention, resolve_stages
from daemon.learn.models import ImageCNN, SequenceGRU, TabularMLP
from daemon.learn.training import fit


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
    loss = HKTLoss(parent, stages=tuple(range(n)))
    with loss.bind(child, x) as trainable:
        p_outs, c_outs = parent.stage_outputs(x), child.stage_outputs(x)
        for k in range(n):
            assert loss.down[str(k)](p_outs[k]).shape == c_outs[k].shape
            assert loss.up[str(k)](c_outs[k]).shape == p_outs[k].shape
        assert len(trainable) == 2 * 2 * n               # a weight and a bias per projection, both ways
        terms = loss(child, x, torch.randint(0, 10, (len(x),)))
    assert set(terms) == {"child", "mix", "reverse", "total"}
    assert all(torch.isfinite(v) for v in terms.values())


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
    history = fit(child, x, y, loss=HKTLoss(parent, stages=tuple(range(len(parent.stages)))), epochs=2,
                  lr=1e-2, batch_size=3)
    assert len(history) == 2 and {"child", "mix", "reverse", "total"} <= set(history[0])
    for n, p in parent.named_parameters():
        assert torch.equal(p, before_parent[n]), f"parent parameter {n} changed"
        assert p.grad is None
    assert [p.requires_grad for p in parent.parameters()] == flags and parent.training
    changed = [n for n, p in child.named_parameters() if not torch.equal(p, before_child[n])]
    assert changed, "the child did not train"
    # nothing of the loss (projections) was added to the child
    assert set(dict(child.named_parameters())) == set(before_child)


def test_hkt_loss_arguments_are_checked():
    with pytest.raises(ValueError):
        HKTLoss(TabularMLP(), stages=())
