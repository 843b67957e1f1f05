"""The streams of ``filial bench cl``: each a list of distinct slices (the accuracy matrix's columns)
and the order their experiences arrive in (its rows), with a fixed train/test split per slice.

- ``split``: MNIST-5k, class-incremental, 5 slices of 2 classes (``split01`` ... ``split89``);
- ``permuted``: MNIST-5k, 5 fixed pixel permutations (the first is the identity);
- ``rotated``: MNIST-5k rotated by 0, 30, 60, 90 and 120 degrees;
- ``tabular``: synthetic Gaussian blobs (5 classes, 8 features) whose centres move twice
  (covariate shift), then the last position with labels 0 and 1 swapped (concept shift);
- ``stationary``: one slice of MNIST-5k, streamed for many batches (its rows repeat, reshuffled,
  once they run out): the control.

The image streams come from :func:`tools.scenarios.continual_stream` (the same slices ``filial bench
merge`` uses). ``rows_per_slice`` keeps a random subset of each slice (train and test in proportion)
for the smaller ``--quick`` streams. Only the train rows are ever streamed or trained on; the test
rows are for evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from tools.datasets import Dataset
from tools.scenarios import Slice, continual_stream

IMAGE_STREAMS = ("split", "permuted", "rotated")
STREAMS = (*IMAGE_STREAMS, "tabular")


@dataclass(frozen=True)
class Stream:
    name: str
    data_type: str
    num_classes: int
    slices: list[Slice]   # distinct slices: the columns of the accuracy matrix
    order: list[int]      # the experiences, as indices into ``slices`` (a slice may recur)

    @property
    def columns(self) -> list[str]:
        return [s.name for s in self.slices]

    def experiences(self) -> list[Slice]:
        return [self.slices[i] for i in self.order]


def _train_test(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float,
                gen: torch.Generator) -> Slice:
    order = torch.randperm(len(y), generator=gen)
    n_test = int(len(y) * test_fraction)
    return Slice(name, x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]])


def _subsample(s: Slice, rows: int | None, gen: torch.Generator) -> Slice:
    if rows is None or rows >= len(s.y_train) + len(s.y_test):
        return s
    test_share = len(s.y_test) / (len(s.y_train) + len(s.y_test))
    n_test = max(1, round(rows * test_share))
    n_train = rows - n_test
    train = torch.randperm(len(s.y_train), generator=gen)[:n_train]
    test = torch.randperm(len(s.y_test), generator=gen)[:n_test]
    return Slice(s.name, s.x_train[train], s.y_train[train], s.x_test[test], s.y_test[test])


def image_stream(ds: Dataset, kind: str, slices: int = 5, rows_per_slice: int | None = None,
                 seed: int = 0, test_fraction: float = 0.2) -> Stream:
    """Split / Permuted / Rotated ``ds`` (:func:`tools.scenarios.continual_stream`), optionally smaller."""
    gen = torch.Generator().manual_seed(seed + 1)
    parts = [_subsample(s, rows_per_slice, gen)
             for s in continual_stream(ds, kind, slices=slices, seed=seed, test_fraction=test_fraction)]
    return Stream(kind, ds.data_type, ds.num_classes, parts, list(range(len(parts))))


def tabular_stream(rows_per_slice: int = 1000, seed: int = 0, features: int = 8, classes: int = 5,
                   spread: float = 1.5, shift: float = 4.0, test_fraction: float = 0.2) -> Stream:
    """Gaussian blobs (unit noise around ``classes`` centres drawn with sd ``spread``): ``base``;
    ``move1``, ``move2`` (every centre moves by ``shift`` in its own random direction, twice: covariate
    shift, each class keeps its blob); ``swap`` (``move2``'s blobs with labels 0 and 1 swapped: concept
    shift, the inputs unchanged). ``swap`` contradicts ``move2`` on two classes, so no model scores
    1 on both."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    centres = torch.randn(classes, features, generator=gen) * spread

    def moved(c: torch.Tensor) -> torch.Tensor:
        step = torch.randn(classes, features, generator=gen)
        return c + shift * step / step.norm(dim=1, keepdim=True)

    def blobs(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(rows_per_slice) % classes)[torch.randperm(rows_per_slice, generator=gen)]
        return (c[y] + torch.randn(rows_per_slice, features, generator=gen)).float(), y.long()

    move1 = moved(centres)
    move2 = moved(move1)
    parts = []
    for name, c, swap in (("base", centres, False), ("move1", move1, False), ("move2", move2, False),
                          ("swap", move2, True)):
        x, y = blobs(c)
        if swap:
            y = torch.where(y == 0, 1, torch.where(y == 1, 0, y))
        parts.append(_train_test(name, x, y, test_fraction, gen))
    return Stream("tabular", "tabular", classes, parts, list(range(len(parts))))


def stationary_stream(ds: Dataset, rows: int | None = None, seed: int = 0, test_fraction: float = 0.2) -> Stream:
    """One slice (``stationary``) of ``ds``: ``rows`` random rows (all by default), split train/test."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    order = torch.randperm(len(ds.y), generator=gen)[:rows or len(ds.y)]
    part = _train_test("stationary", ds.x[order], ds.y[order], test_fraction, gen)
    return Stream("stationary", ds.data_type, ds.num_classes, [part], [0])


def build_stream(name: str, ds: Dataset | None, rows_per_slice: int | None, seed: int = 0) -> Stream:
    if name in IMAGE_STREAMS:
        assert ds is not None
        return image_stream(ds, name, rows_per_slice=rows_per_slice, seed=seed)
    if name == "tabular":
        return tabular_stream(rows_per_slice=rows_per_slice or 1000, seed=seed)
    raise ValueError(f"unknown stream {name!r}; known: {', '.join(STREAMS)}")


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, total: int | None = None,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows in order, ``batch_size`` at a time (the last batch of a pass may be smaller). With
    ``total``: exactly that many full batches, passing over the rows again, each pass reshuffled."""
    if total is None:
        for start in range(0, len(y), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    gen = torch.Generator().manual_seed(30_000 + seed)
    order = torch.arange(len(y))
    at = 0
    for _ in range(total):
        if at + batch_size > len(order):  # next pass
            order = torch.cat([order[at:], torch.randperm(len(y), generator=gen)])
            at = 0
        idx = order[at:at + batch_size]
        at += batch_size
        yield x[idx], y[idx]
