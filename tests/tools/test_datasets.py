"""Datasets a producer can stream: the bundled ones load without a download, ``npz:`` files load
without unpickling, and a wrong name says which names exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.datasets import BUNDLED, load_dataset


def test_digits_are_bundled_8x8_uint8_images():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 8, 8) and ds.x.dtype == torch.uint8 and int(ds.x.max()) == 255
    assert ds.data_type == "image" and ds.num_classes == 10 and ds.y.dtype == torch.int64


def test_mnist5k_is_bundled_500_real_digits_per_class():
    ds = load_dataset("mnist5k")
    assert ds.x.shape == (5000, 28, 28) and ds.x.dtype == torch.uint8
    assert torch.bincount(ds.y).tolist() == [500] * 10 and ds.data_type == "image"


@pytest.mark.parametrize("x,data_type", [
    (np.zeros((6, 4), dtype=np.float32), "tabular"),
    (np.zeros((6, 12), dtype=np.int64), "sequence"),
    (np.zeros((6, 5, 5), dtype=np.uint8), "image"),
], ids=["tabular", "sequence", "image"])
def test_npz_infers_the_data_type(tmp_path, x, data_type):
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(6) % 3)
    for name in (f"npz:{path}", str(path)):  # the prefix, or just a path ending in .npz
        ds = load_dataset(name)
        assert ds.data_type == data_type and tuple(ds.x.shape) == x.shape and ds.y.tolist() == [0, 1, 2, 0, 1, 2]


def test_npz_names_its_data_type(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3), dtype=np.float32), y=np.zeros(4, dtype=np.int64), data_type=np.array("sequence"))
    assert load_dataset(f"npz:{path}").data_type == "sequence"


def test_npz_refusals_say_why(tmp_path):
    missing = tmp_path / "missing.npz"
    np.savez(missing, features=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs arrays 'x' and 'y'"):
        load_dataset(f"npz:{missing}")
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.zeros((3, 2), dtype=np.float32), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="x has 3 rows but y has 2"):
        load_dataset(f"npz:{uneven}")


def test_npz_never_unpickles(tmp_path):
    """An object array needs pickle to load: refused, never executed (docs/architecture.md: no pickle)."""
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("name,says", [
    ("cifar", "unknown dataset"),
    ("torchvision:NoSuchDataset", "has no 'NoSuchDataset'"),
])
def test_a_wrong_name_says_what_exists(name, says):
    with pytest.raises(ValueError, match=says) as info:
        load_dataset(name)
    if says == "unknown dataset":
        assert all(b in str(info.value) for b in BUNDLED) and "npz:<path>" in str(info.value)
