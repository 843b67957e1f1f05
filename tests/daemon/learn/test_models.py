"""Building models: the built-in families, and a published state loaded without drawing initial weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.learn.models import Architecture, infer_architecture


def _trained_state(arch: Architecture) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return arch.build().state_dict()


@pytest.mark.parametrize("data_type, x", [("image", torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)),
                                          ("tabular", torch.randn(4, 12)),
                                          ("sequence", torch.randint(0, 50, (4, 9)))])
def test_build_with_loads_the_state_and_leaves_the_global_rng_alone(data_type, x):
    arch = infer_architecture(data_type, x, 10, None)
    state = _trained_state(arch)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    model = arch.build_with(state)
    assert torch.equal(torch.rand(1), expected_draw)   # nothing drawn for weights it overwrites
    reference = arch.build()
    reference.load_state_dict(state)
    model.eval(), reference.eval()
    x_in = x.float() / 255 if x.dtype == torch.uint8 else x
    assert torch.equal(model(x_in), reference(x_in))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class _WithScratchBuffer(nn.Module):
    """A user model with a non-persistent buffer: not in its state dict, so it must be built normally."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(3, 4)])
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def features(self, x):
        return self.stages[0](x) * self.scale

    def forward(self, x):
        return self.head(self.features(x))


def factory() -> nn.Module:
    return _WithScratchBuffer()


def test_build_with_builds_normally_when_the_state_lacks_a_buffer():
    arch = Architecture(family="custom", params={"factory": f"{__name__}:factory"})
    state = _trained_state(arch)
    model = arch.build_with(state)
    assert torch.equal(model.scale, torch.full((4,), 2.0))   # initialised, not left empty
    with pytest.raises(RuntimeError):
        arch.build_with({k: v for k, v in state.items() if k != "head.bias"})   # strict, as load_state_dict
