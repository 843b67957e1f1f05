"""Training and evaluation loops shared by the engine, merging, transfer and the benchmarks.

Inputs arrive as they travel on the wire (uint8 pixels, float features, integer tokens);
:func:`model_input` is the one place that turns them into what a model eats.
On CUDA the loops use pinned host memory, non-blocking copies and bf16 autocast.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_input(x: torch.Tensor, data_type: str) -> torch.Tensor:
    """Wire tensor → model tensor: uint8 images/features scale to [0, 1], tokens stay integers."""
    if data_type == "sequence":
        return x.long()
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


GradHook = Callable[[nn.Module], None]


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int = 64, device: torch.device | None = None,
                 generator: torch.Generator | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 before_step: GradHook | None = None) -> float:
    """Cross-entropy training with Adam; returns the mean loss of the last epoch.

    ``before_step`` runs between ``backward`` and ``step`` (Child-Tuning masks gradients there).
    Pass a persistent ``optimizer`` to keep Adam's moments across calls.
    """
    device = device or next(model.parameters()).device
    model.train()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    x_dev, y_dev = _to_device(x, device), _to_device(y, device)
    last = 0.0
    for _ in range(epochs):
        # summed on the device in float64 (what ``loss.item()`` would give, bit for bit), read once
        # per epoch: an ``.item()`` per step would make every step wait for the GPU
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for idx in minibatches(len(x_dev), batch_size, generator):
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = F.cross_entropy(model(x_dev[idx]), y_dev[idx])
            loss.backward()
            if before_step is not None:
                before_step(model)
            optimizer.step()
            total += loss.detach().double() * len(idx)
            count += len(idx)
        last = total.item() / max(count, 1)
    model.eval()
    return last


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with _autocast(device):
            outs.append(model(_to_device(x[start:start + batch_size], device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features (``model.features``), on the CPU as float32."""
    device = next(model.parameters()).device
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with _autocast(device):
            outs.append(model.features(_to_device(x[start:start + batch_size], device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()
