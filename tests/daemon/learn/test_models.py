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


def test_build_with_adopt_takes_the_state_tensors_where_their_layout_is_the_models():
    arch = infer_architecture("image", torch.zeros(1, 28, 28, dtype=torch.uint8), 10, None)
    state = {k: v.contiguous() for k, v in _trained_state(arch).items()}   # as decoded from safetensors
    linear = next(k for k, v in state.items() if v.dim() == 2)
    state[linear] = state[linear].t().contiguous().t()    # same values, column-major: not the model's layout
    copy = {k: v.clone() for k, v in state.items()}
    model = arch.build_with(state, adopt=True)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    convs = [k for k, v in params.items() if v.dim() == 4 and v.shape[1] > 1]
    assert convs and all(params[k].is_contiguous(memory_format=torch.channels_last) for k in convs)  # copied
    assert all(params[k].data_ptr() == v.data_ptr() for k, v in state.items() if k not in (linear, *convs))
    assert params[linear].data_ptr() != state[linear].data_ptr() and params[linear].is_contiguous()  # copied
    assert all(p.requires_grad for p in model.parameters())                 # still trainable parameters
    x = torch.rand(5, 1, 28, 28)
    reference = arch.build_with(copy).eval()
    assert torch.equal(model.eval()(x), reference(x))


def test_build_with_adopt_casts_a_state_of_another_dtype():
    arch = infer_architecture("tabular", torch.randn(4, 12), 10, None)
    state = {k: v.double() for k, v in _trained_state(arch).items()}
    model = arch.build_with(state, adopt=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in state.items())
