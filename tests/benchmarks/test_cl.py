"""``filial bench cl``'s parts, small and fast: the accuracy-matrix metrics (as Avalanche defines
them) on hand-made matrices, the delays, the stream builders, filial's stored rows, the CLI entry.
No full bench run here."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.cl_metrics import avg_acc, bwt, drift_delay, forgetting, mean_sd, summarize, time_to_serve
from benchmarks.cl_streams import batches, image_stream, stationary_stream, tabular_stream
from tools.datasets import Dataset

R3 = [[0.9, 0.1, 0.0],
      [0.7, 0.8, 0.1],
      [0.6, 0.5, 0.9]]


# --- metrics -------------------------------------------------------------------------------------------
def test_average_accuracy_is_the_mean_of_the_last_row():
    assert avg_acc(R3) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert avg_acc([[0.2, 0.4]]) == pytest.approx(0.3)


def test_forgetting_is_accuracy_after_training_minus_at_the_end_over_earlier_slices():
    assert forgetting(R3) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert bwt(R3) == pytest.approx(-forgetting(R3))  # Lopez-Paz & Ranzato: mean_j R[T-1][j] - R[j][j]
    assert summarize(R3) == pytest.approx({"avg_acc": 2 / 3, "forgetting": 0.3, "bwt": -0.3})


def test_forgetting_uses_the_accuracy_right_after_training_not_the_best_one():
    R = [[0.5, 0.0], [0.9, 0.8], [0.4, 0.8]]  # slice 0 peaked later at 0.9: forgetting counts 0.5 - 0.4
    assert forgetting(R, [0, 1, 1]) == pytest.approx(0.1)


def test_backward_transfer_is_positive_when_later_experiences_help():
    R = [[0.5, 0.2], [0.7, 0.9]]
    assert forgetting(R) == pytest.approx(-0.2) and bwt(R) == pytest.approx(0.2)


def test_a_recurring_slice_is_a_new_experience_of_the_same_column():
    # experiences: A, B, A again, C. A's reference is its second training (row 2); B's is row 1.
    R = [[0.9, 0.0, 0.0],
         [0.5, 0.9, 0.0],
         [0.95, 0.6, 0.1],
         [0.8, 0.3, 0.9]]
    assert forgetting(R, [0, 1, 0, 2]) == pytest.approx(((0.95 - 0.8) + (0.9 - 0.3)) / 2)
    # the last experience trained on A again: only B counts
    assert forgetting([[0.9, 0.0], [0.4, 0.9], [0.95, 0.7]], [0, 1, 0]) == pytest.approx(0.9 - 0.7)


def test_one_experience_has_no_forgetting():
    assert forgetting([[0.7, 0.1]]) is None and bwt([[0.7, 0.1]]) is None
    assert summarize([[0.7, 0.1]], [0])["forgetting"] is None


def test_rows_and_experiences_must_agree():
    with pytest.raises(ValueError):
        forgetting(R3, [0, 1])


def test_forgetting_matches_avalanches_plugin_bookkeeping():
    """The bookkeeping of Avalanche 0.6's ``GenericStreamForgetting.after_eval_exp`` (forgetting_bwt.py),
    step by step: before each evaluation the last values are reset; evaluating the experience just
    trained sets its initial value, any other sets its last value; an experience with both yields
    ``initial - last``, and the stream figure averages them. (Replayed here rather than imported:
    importing Avalanche takes tens of seconds.)"""
    R = [[0.9, 0.2, 0.1, 0.0], [0.6, 0.95, 0.1, 0.2], [0.55, 0.7, 0.9, 0.3], [0.5, 0.6, 0.8, 0.85]]
    order = [0, 1, 2, 3]
    initial: dict[int, float] = {}
    for trained, row in zip(order, R):
        last: dict[int, float] = {}
        per_exp = []
        for evaluated, acc in enumerate(row):
            (initial if evaluated == trained else last)[evaluated] = acc
            if evaluated in initial and evaluated in last:
                per_exp.append(initial[evaluated] - last[evaluated])
    assert forgetting(R, order) == pytest.approx(sum(per_exp) / len(per_exp))


def test_mean_and_sd_skip_missing_values():
    assert mean_sd([0.5, 0.7, None]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_sd([0.4]) == (0.4, 0.0)
    assert mean_sd([None, float("nan")]) == (None, None)


def test_time_to_serve_counts_batches_from_the_slice_start():
    # versions as received: after batch 2, 5, 7 (positions in the stream)
    served = [(2, {"a": 0.8, "b": 0.1}), (5, {"a": 0.9, "b": 0.5}), (7, {"a": 0.85, "b": 0.92})]
    final = {"a": 0.9, "b": 1.0}
    # a starts at batch 1: v@2 holds 0.8 < 0.81 -> v@5: 5 - 1 + 1; b starts at batch 4: 0.92 >= 0.9 at batch 7
    assert time_to_serve({"a": 1, "b": 4}, served, final) == {"a": 5, "b": 4}
    # a slice whose first batch already finds a good enough version is served at once
    assert time_to_serve({"a": 6}, served, final) == {"a": 1}
    # never served that well, or nothing to serve
    assert time_to_serve({"b": 4}, served, {"b": 1.0}, fraction=0.95) == {"b": None}
    assert time_to_serve({"c": 1}, served, {"c": 0.0}) == {"c": None}


def test_drift_delay_is_the_first_flagged_batch():
    assert drift_delay({"a": [False, False, True, True], "b": [True], "c": [False, False], "d": []}) == \
        {"a": 3, "b": 1, "c": None, "d": None}


# --- streams -------------------------------------------------------------------------------------------
def _ids_dataset(n: int = 2000) -> Dataset:
    """Images whose first two pixels spell the row number, ten balanced classes."""
    x = torch.zeros(n, 8, 8, dtype=torch.uint8)
    x[:, 0, 0] = torch.arange(n) % 256
    x[:, 0, 1] = torch.arange(n) // 256
    return Dataset("ids", x, torch.arange(n) % 10, "image")


def _ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0].long() + 256 * x[:, 0, 1].long()).tolist())


def test_split_is_class_incremental_with_disjoint_train_and_test_rows():
    stream = image_stream(_ids_dataset(), "split")
    assert stream.columns == ["split01", "split23", "split45", "split67", "split89"]
    assert stream.order == [0, 1, 2, 3, 4] and stream.num_classes == 10 and stream.data_type == "image"
    for i, s in enumerate(stream.slices):
        assert set(s.y_train.tolist()) == set(s.y_test.tolist()) == {2 * i, 2 * i + 1}
        assert len(s.y_train) == 320 and len(s.y_test) == 80
        assert not _ids(s.x_train) & _ids(s.x_test)


def test_smaller_slices_keep_the_train_test_proportion_and_stay_disjoint():
    full = image_stream(_ids_dataset(), "split")
    small = image_stream(_ids_dataset(), "split", rows_per_slice=100)
    for s, big in zip(small.slices, full.slices):
        assert (len(s.y_train), len(s.y_test)) == (80, 20)
        assert _ids(s.x_train) <= _ids(big.x_train) and _ids(s.x_test) <= _ids(big.x_test)


@pytest.mark.parametrize("kind,names", [("permuted", ["perm0", "perm1", "perm2", "perm3", "perm4"]),
                                        ("rotated", ["rot0", "rot30", "rot60", "rot90", "rot120"])])
def test_domain_incremental_streams_have_five_slices_of_all_classes(kind, names):
    stream = image_stream(_ids_dataset(), kind)
    assert stream.columns == names
    for s in stream.slices:
        assert len(s.y_train) == 320 and len(s.y_test) == 80 and s.x_train.shape[1:] == (8, 8)


def test_tabular_moves_the_blobs_then_swaps_two_labels():
    stream = tabular_stream(rows_per_slice=500)
    again = tabular_stream(rows_per_slice=500)
    assert stream.columns == ["base", "move1", "move2", "swap"] and stream.data_type == "tabular"
    assert stream.num_classes == 5
    for s, t in zip(stream.slices, again.slices):  # seeded: the same tensors every time
        assert s.x_train.dtype == torch.float32 and s.x_train.shape == (400, 8) and len(s.y_test) == 100
        assert torch.equal(s.x_train, t.x_train) and torch.equal(s.y_train, t.y_train)

    def centres(s):
        x, y = torch.cat([s.x_train, s.x_test]), torch.cat([s.y_train, s.y_test])
        return torch.stack([x[y == c].mean(0) for c in range(5)])

    base, move1, move2, swap = (centres(s) for s in stream.slices)
    assert ((move1 - base).norm(dim=1) > 2.5).all() and ((move2 - move1).norm(dim=1) > 2.5).all()
    # same inputs as move2; classes 0 and 1 trade labels, the others keep theirs
    assert torch.allclose(swap[[1, 0, 2, 3, 4]], move2, atol=0.5)


def test_stationary_streams_exactly_the_asked_batches_over_repeated_passes():
    stream = stationary_stream(_ids_dataset(500), rows=250)
    s = stream.slices[0]
    assert stream.order == [0] and len(s.y_train) == 200 and len(s.y_test) == 50
    got = list(batches(s.x_train, s.y_train, 30, total=20))
    assert len(got) == 20 and all(len(y) == 30 for _, y in got)
    seen = torch.cat([x for x, _ in got])
    assert _ids(seen[:200]) == _ids(s.x_train)  # the first pass covers every row once, then they repeat
    assert _ids(seen) == _ids(s.x_train)


def test_batches_without_a_total_end_with_the_remainder():
    x, y = torch.arange(120).reshape(120, 1), torch.arange(120)
    assert [len(b) for _, b in batches(x, y, 50)] == [50, 50, 20]


# --- filial's stored rows and the CLI ------------------------------------------------------------------
def test_stored_rows_follow_the_learners_buffers():
    from benchmarks.cl_filial import stored_rows
    from daemon.service.settings import load_settings

    stream = image_stream(_ids_dataset(), "split", rows_per_slice=150)  # 120 train rows: batches 50, 50, 20
    defaults = load_settings(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1")
    assert stored_rows(defaults, stream, 50) == 5 * 120  # every row kept: held out (10+10+4) or replay (96)
    small = load_settings(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1", replay_per_slice=50)
    assert stored_rows(small, stream, 50) == 5 * (24 + 50)


def test_the_cli_lists_the_bench_and_parses_its_flags():
    from daemon import cli

    assert "cl" in cli.BENCHES
    args = cli.build_parser().parse_args(["bench", "cl", "--quick", "--streams", "tabular", "--seeds", "0,1"])
    assert args.quick and args.streams == "tabular" and args.seeds == "0,1" and callable(args.bench_main)
