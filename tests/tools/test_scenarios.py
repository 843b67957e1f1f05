"""Drift scenarios: phases parse or say how to write them, each transform does what it names, and the
phases and continual streams cut a dataset into disjoint shares."""

from __future__ import annotations

import pytest
import torch

from tools.datasets import Dataset
from tools.scenarios import KINDS, Phase, Transform, continual_stream, parse_phase, split_into_phases


def _images(n=8, side=6):
    x = torch.arange(n * side * side).remainder(256).to(torch.uint8).reshape(n, side, side)
    return x, torch.arange(n) % 4


def test_a_phase_is_a_name_and_its_transforms():
    assert parse_phase("rot90=rotate:90") == Phase("rot90", (Transform("rotate", "90"),))
    assert parse_phase("mix=rotate:30,noise:10") == Phase("mix", (Transform("rotate", "30"), Transform("noise", "10")))
    assert parse_phase("up=identity") == Phase("up", (Transform("identity"),))
    assert parse_phase("up=") == Phase("up", ())


@pytest.mark.parametrize("text,says", [
    ("rot90", "name=transform"),
    ("=rotate:90", "name=transform"),
    ("x=spin:90", "unknown transform"),
    ("x=rotate", "needs an argument"),
    ("x=rotate:left", "bad argument"),
    ("x=permute:1.5", "bad argument"),
    ("x=classes:0-a", "bad argument"),
])
def test_a_bad_phase_says_how_to_write_one(text, says):
    with pytest.raises(ValueError, match=says) as info:
        parse_phase(text)
    if says == "unknown transform":
        assert all(kind in str(info.value) for kind in KINDS)


def test_identity_keeps_the_batch():
    x, y = _images()
    x2, y2 = parse_phase("a=identity").apply(x, y)
    assert torch.equal(x2, x) and torch.equal(y2, y)


@pytest.mark.parametrize("shape", [(8, 6, 6), (8, 3, 6, 6)], ids=["NHW", "NCHW"])
def test_rotate_turns_each_image_and_keeps_its_shape(shape):
    x = torch.arange(torch.Size(shape).numel()).remainder(256).to(torch.uint8).reshape(shape)
    y = torch.arange(shape[0])
    rotated, labels = parse_phase("r=rotate:90").apply(x, y)
    assert rotated.shape == x.shape and torch.equal(labels, y)
    assert torch.equal(rotated, torch.rot90(x, 1, (-2, -1)))  # counter-clockwise, exactly, at 90°
    again = x
    for _ in range(4):
        again, _ = parse_phase("r=rotate:90").apply(again, y)
    assert torch.equal(again, x)


def test_permute_is_a_fixed_pixel_permutation_per_seed():
    x, y = _images()
    a, _ = parse_phase("p=permute:3").apply(x, y)
    b, _ = parse_phase("q=permute:3").apply(x, y)
    c, _ = parse_phase("r=permute:4").apply(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert torch.equal(a.flatten(1).sort().values, x.flatten(1).sort().values)


def test_noise_stays_in_the_pixel_range_and_is_reproducible():
    x, y = _images()
    a, _ = parse_phase("n=noise:60").apply(x, y)
    b, _ = parse_phase("n=noise:60").apply(x, y)
    assert a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, x)
    features = torch.rand(8, 5)
    noisy, _ = parse_phase("n=noise:0.5").apply(features, y)
    assert noisy.dtype == torch.float32 and not torch.equal(noisy, features)


def test_classes_keeps_only_those_labels():
    x, y = _images()
    kept_x, kept_y = parse_phase("c=classes:0-2").apply(x, y)
    assert set(kept_y.tolist()) == {0, 2} and len(kept_x) == len(kept_y) == int(((y == 0) | (y == 2)).sum())


def _numbered(n=100, classes=10) -> Dataset:
    """Row i holds the value i, so shares can be told apart."""
    return Dataset("numbered", torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % classes, "tabular")


def test_phases_get_disjoint_shares_with_their_shift():
    ds = _numbered()
    out = split_into_phases(ds, [parse_phase("a=identity"), parse_phase("b=classes:1-2")], seed=1,
                            samples_per_phase=40)
    (pa, xa, ya), (pb, xb, yb) = out
    assert (pa.name, pb.name) == ("a", "b") and len(xa) == 40
    assert set(yb.tolist()) <= {1, 2}
    rows_a, rows_b = set(xa.flatten().tolist()), set(xb.flatten().tolist())
    assert not rows_a & rows_b
    assert torch.equal(ds.y[xa.flatten().long()], ya)  # labels stay with their rows
    again = split_into_phases(ds, [parse_phase("a=identity"), parse_phase("b=classes:1-2")], seed=1,
                              samples_per_phase=40)
    assert torch.equal(again[0][1], xa)  # the same seed, the same cut
    even = split_into_phases(ds, [parse_phase("a=identity"), parse_phase("b=identity")])
    assert [len(x) for _, x, _ in even] == [50, 50]  # default: the dataset split evenly


def test_continual_streams_hold_out_a_disjoint_part_of_each_slice():
    ds = _numbered(200)
    split = continual_stream(ds, "split", slices=5, seed=0, test_fraction=0.25)
    assert [s.name for s in split] == ["split01", "split23", "split45", "split67", "split89"]
    for i, s in enumerate(split):
        assert set(torch.cat([s.y_train, s.y_test]).tolist()) == {2 * i, 2 * i + 1}
        assert not set(s.x_train.flatten().tolist()) & set(s.x_test.flatten().tolist())
        assert len(s.x_test) == int((len(s.x_train) + len(s.x_test)) * 0.25)
    images = Dataset("img", _images(100)[0], torch.arange(100) % 10, "image")
    assert [s.name for s in continual_stream(images, "permuted", slices=3)] == ["perm0", "perm1", "perm2"]
    assert [s.name for s in continual_stream(images, "rotated", slices=3)] == ["rot0", "rot30", "rot60"]
    with pytest.raises(ValueError, match="unknown stream"):
        continual_stream(images, "shuffled")
