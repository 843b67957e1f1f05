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


def test_npz_arrays_are_converted_to_what_the_wire_takes(tmp_path):
    """numpy's default float64 (sent as is, the daemon dead-lettered every batch as bad_dtype)."""
    from consumers.wire import WireLimits, decode_batch, encode_batch

    path = tmp_path / "f64.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(6, 4)), y=np.array([0., 1., 2., 0., 1., 2.]))
    ds = load_dataset(f"npz:{path}")
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 1, 2, 0, 1, 2]
    value, headers = encode_batch(ds.x, ds.y, "s", ds.data_type, "b0")
    assert decode_batch(value, headers, WireLimits()).x.dtype == torch.float32  # the daemon accepts it
    pixels = tmp_path / "pixels.npz"
    np.savez(pixels, x=np.full((2, 3, 3), 200, dtype=np.int64), y=np.array([1, 0]))
    assert load_dataset(f"npz:{pixels}").x.dtype == torch.uint8


def test_npz_that_cannot_be_converted_is_refused_in_one_line(tmp_path):
    fractional = tmp_path / "fractional.npz"
    np.savez(fractional, x=np.zeros((2, 3), dtype=np.float32), y=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="whole class numbers"):
        load_dataset(f"npz:{fractional}")
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.array([[np.nan, 1.0]]), y=np.array([0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_dataset(f"npz:{nan}")
    with pytest.raises(ValueError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
