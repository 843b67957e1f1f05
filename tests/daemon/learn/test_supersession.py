"""The supersession detector alone: a batch that renames an older slice's classes on that slice's
inputs is found; a new domain, label noise, new classes and other inputs are not."""

from __future__ import annotations

import torch

from daemon.learn.supersession import (MIN_EXPLAINED, contradicted, may_relabel, profile, relabelling)

CLASSES = 5
ALPHA = 1e-5


def _blobs(n: int, seed: int, shift: float = 0.0, classes: int = CLASSES):
    """Rows of ``classes`` well-separated blobs in 8 features (a model's features), the label of each."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.eye(8)[:classes] * 6.0 + shift
    return centres[y] + torch.randn(n, 8, generator=gen), y


def _predict(features: torch.Tensor) -> torch.Tensor:
    """The published version: the nearest of the original centres (right on the old slice's rows)."""
    centres = torch.eye(8)[:CLASSES] * 6.0
    return torch.cdist(features, centres).argmin(1)


def _profiles(**slices):
    out = {}
    for name, (f, y) in slices.items():
        logits = -torch.cdist(f, torch.eye(8)[:CLASSES] * 6.0)
        out[name] = profile(f, logits, y, CLASSES)
    return out


def _swap(y: torch.Tensor, a: int = 0, b: int = 1) -> torch.Tensor:
    return torch.where(y == a, b, torch.where(y == b, a, y))


def _judge(features, labels, profiles):
    return contradicted(_predict(features), labels, features, profiles, CLASSES, kl_threshold=0.5, alpha=ALPHA,
                        min_rows=32)


def test_renamed_classes_are_explained_by_a_renaming_and_noise_is_not():
    f, y = _blobs(100, 1)
    swapped = relabelling(_predict(f), _swap(y), CLASSES)
    assert swapped.accuracy < 0.7 and swapped.remapped > 0.95
    assert swapped.explained(1.0) >= MIN_EXPLAINED and may_relabel(swapped)
    noisy_y = torch.where(torch.rand(100, generator=torch.Generator().manual_seed(2)) < 0.4,
                          torch.randint(CLASSES, (100,), generator=torch.Generator().manual_seed(3)), y)
    noisy = relabelling(_predict(f), noisy_y, CLASSES)
    assert noisy.accuracy < 0.8 and noisy.explained(1.0) < 0.5 and not may_relabel(noisy)
    clean = relabelling(_predict(f), y, CLASSES)
    assert clean.accuracy == clean.remapped == 1.0 and not may_relabel(clean)


def test_a_batch_that_swaps_two_labels_on_the_old_inputs_contradicts_that_slice():
    old = _blobs(200, 1)
    moved = _blobs(200, 2, shift=20.0)
    f, y = _blobs(50, 3)
    found = _judge(f, _swap(y), _profiles(old=old, moved=moved))
    assert found is not None and found.slice == "old"
    assert found.expected == 1.0 and found.explained >= MIN_EXPLAINED and found.kl < 0.5
    assert "relabels 'old'" in found.describe()


def test_the_same_labels_or_new_inputs_or_new_classes_contradict_nothing():
    profiles = _profiles(old=_blobs(200, 1))
    f, y = _blobs(50, 3)
    assert _judge(f, y, profiles) is None                          # the old concept, unchanged
    far, far_y = _blobs(50, 4, shift=3.0)                          # other inputs, which the model names wrongly
    assert _judge(far, _swap(far_y), profiles) is None
    assert contradicted(_predict(far), _swap(far_y), far, profiles, CLASSES, kl_threshold=1e9, alpha=ALPHA,
                        min_rows=32) is not None                   # only the inputs told them apart
    scrambled = y[torch.randperm(50, generator=torch.Generator().manual_seed(5))]
    assert _judge(f, scrambled, profiles) is None                  # labels that no renaming explains
    two = _profiles(old=(_blobs(200, 1)[0][:80], _blobs(200, 1)[1][:80] % 2))  # a slice of classes 0 and 1
    new_classes = torch.where(y < 2, y + 2, y)                     # classes 2-4 only: none the slice has
    assert _judge(f[y >= 2], new_classes[y >= 2], two) is None


def test_a_new_domain_whose_predictions_are_noise_is_not_a_relabelling():
    profiles = _profiles(old=_blobs(200, 1))
    gen = torch.Generator().manual_seed(6)
    f = torch.randn(50, 8, generator=gen) * 3.0                    # rows the model has no classes for
    y = torch.arange(50) % CLASSES
    assert _judge(f, y, profiles) is None


def test_of_two_slices_with_the_labels_the_one_with_the_same_inputs_is_named():
    near, far = _blobs(200, 1), _blobs(200, 2, shift=0.8)
    f, y = _blobs(50, 3)
    found = _judge(f, _swap(y), _profiles(far=far, near=near))
    assert found is not None and found.slice == "near"


def test_too_few_rows_of_the_slice_s_labels_decide_nothing():
    f, y = _blobs(20, 3)
    assert _judge(f, _swap(y), _profiles(old=_blobs(200, 1))) is None


def test_a_new_class_taken_for_an_old_one_is_a_mistake_not_a_renaming():
    # a slice of classes 2-4 on a class-incremental stream; the version, right on its held-out rows,
    # takes some of the batch's class-4 rows for class 0, which the slice never had
    held_f, held_y = _blobs(300, 1)
    profiles = _profiles(new=(held_f[held_y >= 2], held_y[held_y >= 2]))
    f, y = _blobs(150, 3)
    f, y = f[y >= 2], y[y >= 2]
    predicted = _predict(f)
    predicted[torch.nonzero(y == 4).flatten()[:8]] = 0
    anything = relabelling(predicted, y, CLASSES)                  # renaming 0 -> 4 would explain every error
    assert anything.accuracy < 0.95 and anything.explained(1.0) >= MIN_EXPLAINED and may_relabel(anything)
    own = relabelling(predicted, y, CLASSES, renamable=profiles["new"].classes)
    assert own.remapped == own.accuracy
    assert contradicted(predicted, y, f, profiles, CLASSES, kl_threshold=0.5, alpha=ALPHA, min_rows=32) is None
