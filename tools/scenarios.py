"""Drift scenarios: a dataset cut into named phases (slices), each with its own shift.

A phase is written ``name=transform[,transform...]``; transforms:

- ``rotate:<degrees>``   rotate images by a fixed angle;
- ``permute:<seed>``     a fixed pixel permutation (the "Permuted MNIST" shift);
- ``noise:<std>``        additive gaussian noise, in pixel units of 0-255;
- ``classes:<a>-<b>...`` keep only these labels (e.g. ``classes:0-1``; class-incremental);
- ``identity``           no shift.

Example: ``upright=identity rot90=rotate:90 noisy=noise:60``.
The standard continual streams (Split, Permuted, Rotated) used by the benchmarks are built here
too, each slice with a disjoint held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tools.datasets import Dataset


@dataclass(frozen=True)
class Transform:
    kind: str
    arg: str = ""

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "identity":
            return x, y
        if self.kind == "rotate":
            from torchvision.transforms.functional import rotate

            images = x.unsqueeze(1) if x.dim() == 3 else x
            rotated = rotate(images, float(self.arg))
            return (rotated.squeeze(1) if x.dim() == 3 else rotated), y
        if self.kind == "permute":
            gen = torch.Generator().manual_seed(int(self.arg))
            flat = x.reshape(len(x), -1)
            perm = torch.randperm(flat.shape[1], generator=gen)
            return flat[:, perm].reshape(x.shape), y
        if self.kind == "noise":
            gen = torch.Generator().manual_seed(len(x))
            noisy = x.float() + torch.randn(x.shape, generator=gen) * float(self.arg)
            return (noisy.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else noisy), y
        if self.kind == "classes":
            keep = torch.tensor([int(c) for c in self.arg.split("-")])
            mask = torch.isin(y, keep)
            return x[mask], y[mask]
        raise ValueError(f"unknown transform {self.kind!r}")


KINDS = ("identity", "rotate", "permute", "noise", "classes")


def parse_transform(text: str) -> Transform:
    kind, _, arg = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown transform {text!r}; use one of {', '.join(KINDS)} (see 'filial produce --help')")
    if kind != "identity" and not arg:
        raise ValueError(f"transform {kind!r} needs an argument, e.g. {kind}:{'90' if kind == 'rotate' else '1'}")
    try:
        if kind in ("rotate", "noise"):
            float(arg)
        elif kind == "permute":
            int(arg)
        elif kind == "classes":
            [int(c) for c in arg.split("-")]
    except ValueError:
        raise ValueError(f"transform {text!r}: bad argument {arg!r}") from None
    return Transform(kind, arg)


@dataclass(frozen=True)
class Phase:
    name: str
    transforms: tuple[Transform, ...] = field(default_factory=tuple)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for t in self.transforms:
            x, y = t.apply(x, y)
        return x, y


def parse_phase(text: str) -> Phase:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"phase {text!r} must look like name=transform[,transform], e.g. rot90=rotate:90")
    return Phase(name, tuple(parse_transform(t) for t in spec.split(",") if t))


def split_into_phases(ds: Dataset, phases: list[Phase], seed: int = 0,
                      samples_per_phase: int | None = None) -> list[tuple[Phase, torch.Tensor, torch.Tensor]]:
    """Shuffle once, give each phase a disjoint share of the data, apply its shift."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.x), generator=gen)
    share = samples_per_phase or len(order) // len(phases)
    out = []
    for i, phase in enumerate(phases):
        idx = order[(i * share) % len(order):][:share]
        out.append((phase, *phase.apply(ds.x[idx], ds.y[idx])))
    return out


@dataclass(frozen=True)
class Slice:
    """One task of a continual stream, with its held-out part."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _train_test(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float,
                gen: torch.Generator) -> Slice:
    order = torch.randperm(len(x), generator=gen)
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Slice(name, x[train], y[train], x[test], y[test])


def continual_stream(ds: Dataset, kind: str, slices: int = 5, seed: int = 0,
                     test_fraction: float = 0.2) -> list[Slice]:
    """Split (pairs of classes), Permuted (a permutation per slice), Rotated (0/30/60/90/120°)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.x), generator=gen)
    x, y = ds.x[order], ds.y[order]
    out = []
    if kind == "split":
        for i in range(slices):
            classes = [2 * i, 2 * i + 1]
            mask = torch.isin(y, torch.tensor(classes))
            out.append(_train_test(f"split{classes[0]}{classes[1]}", x[mask], y[mask], test_fraction, gen))
        return out
    share = len(x) // slices
    for i in range(slices):
        xi, yi = x[i * share:(i + 1) * share], y[i * share:(i + 1) * share]
        if kind == "permuted":
            phase = Phase(f"perm{i}", () if i == 0 else (Transform("permute", str(1000 + i)),))
        elif kind == "rotated":
            phase = Phase(f"rot{30 * i}", (Transform("rotate", str(30 * i)),))
        else:
            raise ValueError(f"unknown stream {kind!r}: split, permuted or rotated")
        xi, yi = phase.apply(xi, yi)
        out.append(_train_test(phase.name, xi, yi, test_fraction, gen))
    return out
