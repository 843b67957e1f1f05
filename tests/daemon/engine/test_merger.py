"""The merger alone (no servers): consolidation on slice-balanced replay at merge time brings back
what a class-incremental stream made the served model forget."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from daemon.engine.merger import MergeSnapshot, merge, rehearse
from daemon.engine.settings import LearnerSettings, MergeSettings
from daemon.engine.state import cpu_state
from daemon.learn.models import infer_architecture
from daemon.learn.training import accuracy, fit


def _blobs(classes: list[int], rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 8, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.tensor(classes)[torch.randint(len(classes), (rows,), generator=gen)]
    return centres[y] + torch.randn(rows, 8, generator=gen), y


def _snapshot() -> MergeSnapshot:
    """Served: knows slice a (classes 0, 1). Working: the same model after training on slice b
    (classes 2, 3) alone, which pushed a's classes out."""
    (xa, ya), (xb, yb) = _blobs([0, 1], 300, 1), _blobs([2, 3], 300, 2)
    arch = infer_architecture("tabular", xa, 10, None)
    torch.manual_seed(0)
    served = arch.build()
    fit(served, xa[:200], ya[:200], epochs=5, lr=1e-3, generator=torch.Generator().manual_seed(0))
    working = copy.deepcopy(served)
    fit(working, xb[:200], yb[:200], epochs=20, lr=1e-3, generator=torch.Generator().manual_seed(0))
    return MergeSnapshot(base=cpu_state(served), served=cpu_state(served), working=cpu_state(working),
                         working_weight=1.0, children=[], weights=[], ids=[], distill={},
                         replay={"a": (xa[:200], ya[:200]), "b": (xb[:200], yb[:200])},
                         heldout={"a": (xa[200:], ya[200:]), "b": (xb[200:], yb[200:])},
                         served_version=1, base_version=1, architecture=arch, data_type="tabular", seed=0)


def _merge(snap: MergeSnapshot, consolidate_epochs: int):
    return merge(snap, MergeSettings(consolidate_epochs=consolidate_epochs), LearnerSettings(), torch.device("cpu"))


def test_consolidation_restores_the_slice_new_classes_pushed_out():
    snap = _snapshot()
    plain, consolidated = _merge(snap, 0), _merge(snap, 3)
    assert "consolidate" not in plain.plan
    assert consolidated.plan["consolidate"]["slices"] == 2 and consolidated.plan["consolidate"]["rows_per_slice"] == 200
    # without it the candidate is the working model: b learned, a forgotten, and the gate says no
    assert plain.candidate_metrics["a"] < 0.5 and plain.candidate_metrics["b"] > 0.9 and not plain.accepted
    # with it both slices are served, and the gate publishes it
    assert consolidated.candidate_metrics["a"] > 0.9 and consolidated.candidate_metrics["b"] > 0.9
    assert consolidated.accepted, consolidated.reason
    assert consolidated.working_takes_candidate and not plain.working_takes_candidate


def test_patience_on_the_selection_loss_ends_a_consolidation_a_bound_would_cut_short():
    """A buffer of a few rows is one optimizer step an epoch: 16 epochs stopped it while it was still
    learning. Given room, it runs until the selection rows' loss stops falling for ``patience`` epochs
    (then keeps its best), and serves both slices better for it."""
    (xa, ya), (xb, yb) = _blobs([0, 1, 2, 3, 4], 140, 1), _blobs([5, 6, 7, 8, 9], 140, 2)
    arch = infer_architecture("tabular", xa, 10, None)
    torch.manual_seed(0)
    untrained = cpu_state(arch.build())
    snap = MergeSnapshot(base=untrained, served=untrained, working=untrained, working_weight=1.0, children=[],
                         weights=[], ids=[], distill={}, replay={"a": (xa[:16], ya[:16]), "b": (xb[:16], yb[:16])},
                         heldout={"a": (xa[16:], ya[16:]), "b": (xb[16:], yb[16:])}, served_version=1,
                         base_version=1, architecture=arch, data_type="tabular", seed=0)
    room = MergeSettings(consolidate_epochs=200)
    bounded = merge(snap, MergeSettings(consolidate_epochs=16), LearnerSettings(), torch.device("cpu"))
    free = merge(snap, room, LearnerSettings(), torch.device("cpu"))
    assert bounded.plan["consolidate"]["best_epoch"] == 16          # still improving when the bound stopped it
    report = free.plan["consolidate"]
    assert 16 < report["epochs"] < room.consolidate_epochs
    assert report["epochs"] - report["best_epoch"] == room.consolidate_patience
    losses = report["selection_loss"]
    assert losses[report["best_epoch"]] == min(losses) and min(losses[-room.consolidate_patience:]) > min(losses)
    for name in ("a", "b"):
        assert free.candidate_metrics[name] > bounded.candidate_metrics[name]


def test_epochs_of_a_few_rows_are_lengthened_to_min_epoch_rows():
    """An untrained model on a slice of 24 rows: an epoch is one optimizer step. With ``min_epoch_rows``
    each epoch repeats the rows to that many (what a paused bootstrap's first model trains with), so
    patience, counted in epochs, spans that many rows of steps: fewer epochs to the same model."""
    x, y = _blobs([0, 1, 2, 3, 4], 224, 3)
    arch = infer_architecture("tabular", x, 10, None)
    replay, select, judge = {"a": (x[:24], y[:24])}, {"a": (x[24:124], y[24:124])}, (x[124:], y[124:])
    settings = MergeSettings(consolidate_patience=2)
    reports, scores = {}, {}
    for rows in (0, 640):
        torch.manual_seed(0)
        model = arch.build()
        reports[rows] = rehearse(model, replay, select, "tabular", settings, LearnerSettings(),
                                 torch.Generator().manual_seed(0), min_epoch_rows=rows)
        assert reports[rows]["rows_per_slice"] == max(24, rows)
        scores[rows] = accuracy(model, *judge)
    assert reports[640]["epochs"] * 3 < reports[0]["epochs"]
    assert min(scores.values()) > 0.95


def test_consolidation_is_a_function_of_the_snapshot():
    snap = _snapshot()
    first, again = _merge(snap, 2), _merge(snap, 2)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)


def test_consolidation_rows_are_capped_across_slices():
    snap = _snapshot()
    outcome = merge(snap, MergeSettings(consolidate_epochs=1, consolidate_max_rows=150), LearnerSettings(),
                    torch.device("cpu"))
    assert outcome.plan["consolidate"]["rows_per_slice"] == 75   # 150 rows shared by two slices


def test_the_gate_weighs_slices_by_recency():
    """With ``recency_half_life`` the gate's overall gain weighs a slice by 2^-(its age / half-life)
    in batches: b, seen just now, counts four times a, last seen two half-lives ago."""
    snap = dataclasses.replace(_snapshot(), slice_age={"a": 32, "b": 0})
    equal = merge(snap, MergeSettings(consolidate_epochs=1, recency_half_life=0), LearnerSettings(), torch.device("cpu"))
    recent = merge(snap, MergeSettings(consolidate_epochs=1, recency_half_life=16), LearnerSettings(),
                   torch.device("cpu"))
    assert {s.slice: round(s.weight, 3) for s in equal.verdict.slices} == {"a": 0.5, "b": 0.5}
    assert {s.slice: round(s.weight, 3) for s in recent.verdict.slices} == {"a": 0.2, "b": 0.8}
    assert recent.verdict.gain == pytest.approx(sum(s.weight * s.diff for s in recent.verdict.slices))
