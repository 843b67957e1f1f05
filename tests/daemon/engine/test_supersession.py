"""Labels that change on inputs the learner has seen reach followers: the contradicted slice is
superseded after two batches in a row (not one), the gate then publishes the new concept, and a
covariate shift supersedes nothing (daemon.learn.supersession through the engine)."""

from __future__ import annotations

import torch

from consumers.wire import Batch, BatchSource
from daemon.engine.engine import Engine
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from daemon.learn.training import accuracy

CLASSES, FEATURES = 5, 8
GEN = torch.Generator().manual_seed(10)
CENTRES = torch.randn(CLASSES, FEATURES, generator=GEN) * 1.5
MOVED = CENTRES + 4.0 * torch.nn.functional.normalize(torch.randn(CLASSES, FEATURES, generator=GEN), dim=1)


def _rows(n: int, seed: int, centres: torch.Tensor = CENTRES, swap: bool = False):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=gen)
    x = centres[y] + torch.randn(n, FEATURES, generator=gen)
    if swap:
        y = torch.where(y == 0, 1, torch.where(y == 1, 0, y))
    return x, y


def _engine(**learner) -> Engine:
    return Engine(ModelSettings(num_classes=CLASSES), LearnerSettings(**learner), MergeSettings(after_child_updates=4),
                  torch.device("cpu"))


class Driver:
    """The engine as the daemon drives it with a count-triggered merge: every version adopted."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.version, self.n = engine, 0, 0

    def batches(self, name: str, seed: int, count: int, rows: int = 50, **kind):
        results = []
        for i in range(count):
            x, y = _rows(rows, seed * 1000 + i, **kind)
            result = self.engine.process(Batch(x, y, name, "tabular", f"b{self.n}", BatchSource("t", 0, self.n)))
            self.n += 1
            results.append(result)
            if result.publish_bootstrap:
                self.version += 1
                self.engine.adopt_bootstrap(self.version)
            elif result.merge_due:
                self.merge()
        return results

    def merge(self) -> None:
        outcome = self.engine.merge()
        if outcome is not None and outcome.accepted:
            self.version += 1
            self.engine.adopt_merge(outcome, self.version)

    def served_accuracy(self, **kind) -> float:
        model = self.engine.architecture.build()
        model.load_state_dict(self.engine.served_state())
        x, y = _rows(400, 99, **kind)
        return accuracy(model, x, y)


def test_a_new_slice_that_swaps_two_labels_supersedes_the_old_one_and_is_served():
    drive = Driver(_engine())
    drive.batches("old", 1, 16)
    assert drive.served_accuracy() > 0.9
    results = drive.batches("new", 2, 16, swap=True)
    superseded = [i for i, r in enumerate(results) if r.superseded_slice]
    assert superseded and results[superseded[0]].superseded_slice == "old"
    assert superseded[0] >= 1  # never on the first contradicting batch alone
    assert "relabels 'old'" in results[superseded[0]].reason
    assert not drive.engine.knows_slice("old") and drive.engine.knows_slice("new")
    drive.merge()
    assert drive.served_accuracy(swap=True) > 0.9  # followers get the new labels
    assert drive.served_accuracy() < 0.8


def test_labels_that_change_within_one_slice_replace_its_past():
    drive = Driver(_engine())
    drive.batches("s", 1, 16)
    results = drive.batches("s", 2, 16, swap=True)
    assert [r.superseded_slice for r in results].count("s") == 1
    drive.merge()
    assert drive.served_accuracy(swap=True) > 0.9


def test_one_relabelled_batch_supersedes_nothing_and_the_count_survives_a_restart():
    drive = Driver(_engine())
    drive.batches("old", 1, 16)
    [first] = drive.batches("new", 2, 1, swap=True)
    assert first.superseded_slice is None
    [back] = drive.batches("new", 3, 1)                     # the old labels again: the count starts over
    assert back.superseded_slice is None
    [again] = drive.batches("new", 4, 1, swap=True)
    assert again.superseded_slice is None and drive.engine.knows_slice("old")
    restored = _engine()
    restored.restore(*drive.engine.checkpoint())            # one contradicting batch is on record
    drive.engine = restored
    [second] = drive.batches("new", 5, 1, swap=True)
    assert second.superseded_slice == "old"


def test_a_slice_without_held_out_rows_is_passed_over():
    drive = Driver(_engine())
    drive.batches("old", 1, 16)
    drive.batches("single", 7, 2, rows=1)  # one-row batches keep no held-out row
    results = drive.batches("new", 2, 3, swap=True)
    assert [r.superseded_slice for r in results] == [None, "old", None]


def test_batches_under_min_spawn_rows_are_judged_together():
    drive = Driver(_engine())
    drive.batches("old", 1, 16)
    results = drive.batches("new", 2, 8, rows=12, swap=True)  # min_spawn_rows 32: judged every third batch
    superseded = [i for i, r in enumerate(results) if r.superseded_slice]
    assert superseded == [5], [r.reason for r in results]  # rows 36 and 72: two judgements, the second supersedes


def test_a_covariate_shift_supersedes_nothing():
    drive = Driver(_engine())
    drive.batches("old", 1, 16)
    results = drive.batches("moved", 2, 16, centres=MOVED)
    assert all(r.superseded_slice is None for r in results)
    assert drive.engine.knows_slice("old")


def test_with_supersede_off_the_oldest_labels_stay_guarded():
    drive = Driver(_engine(supersede=False))
    drive.batches("old", 1, 16)
    results = drive.batches("new", 2, 8, swap=True)
    assert all(r.superseded_slice is None for r in results) and drive.engine.knows_slice("old")
    drive.merge()
    assert drive.served_accuracy() > 0.9  # what followers hold keeps the old labels
