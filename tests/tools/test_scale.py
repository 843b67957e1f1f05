"""The small scale test CI runs (``make scale`` runs the full one: 3 learners, 12 partitions): two
``filial run`` learners in one group on four partitions, one SIGKILLed mid-training and the leader
mid-merge, both restarted; every batch applied once across their checkpoints, versions contiguous,
each published by the lease holder of its time with tokens that never decrease, the served accuracy
compared with one learner's on the same stream (tools/scale.py)."""

from __future__ import annotations

import argparse

import torch

from tools import scale


def _rows(right: int, wrong: int) -> torch.Tensor:
    return torch.tensor([True] * right + [False] * wrong)


def test_one_learner_ahead_by_what_runs_of_it_differ_by_is_not_below():
    # two slices of 400 rows; the learners get 6 rows wrong that one learner got right and 4 the reverse
    single = {"s0": _rows(360, 40), "s1": _rows(380, 20)}
    group = {"s0": torch.cat([_rows(354, 6), _rows(4, 36)]), "s1": single["s1"].clone()}
    verdict = scale.against_one_learner(group, single, alpha=0.05, tolerance=0.05)
    assert verdict["difference"] < 0 and not verdict["below"], verdict


def test_learners_worse_overall_by_the_paired_test_are_below():
    # 30 rows lost, 8 gained on each of two slices: a small drop per slice, significant overall
    single = {s: _rows(360, 40) for s in ("s0", "s1")}
    group = {s: torch.cat([_rows(330, 30), _rows(8, 32)]) for s in single}
    verdict = scale.against_one_learner(group, single, alpha=0.05, tolerance=0.05)
    assert verdict["below"] and verdict["p_one_learner_better"] < 0.05 and not verdict["slices_below"], verdict


def test_one_slice_dropping_beyond_the_tolerance_is_below_though_the_rest_gains():
    single = {"s0": _rows(360, 40), "s1": _rows(300, 100), "s2": _rows(300, 100)}
    group = {"s0": torch.cat([_rows(280, 80), _rows(0, 40)]),            # 0.90 -> 0.70
             "s1": torch.cat([_rows(300, 0), _rows(60, 40)]), "s2": torch.cat([_rows(300, 0), _rows(60, 40)])}
    verdict = scale.against_one_learner(group, single, alpha=0.05, tolerance=0.05)
    assert verdict["difference"] > 0 and verdict["below"], verdict
    assert [s.split(":")[0] for s in verdict["slices_below"]] == ["s0"], verdict

def test_two_learners_survive_sigkills_and_apply_every_batch_once(tmp_path):
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    args = parser.parse_args(["--learners", "2", "--partitions", "4", "--slices", "4", "--batches", "80",
                              "--rate", "10", "--settle", "30", "--baseline-runs", "1",
                              "--out-dir", str(tmp_path)])
    result = scale.main(args)
    assert result["batches_lost"] == 0, result
    assert result["version_gaps"] == 0 and result["duplicate_versions"] == 0 and result["events_without_data"] == 0
    assert not result["leader_mismatches"] and not result["token_decreases"], result
    assert [k["target"] for k in result["kills"]] == ["train", "merge"], result["kills"]
    # a batch trains in ~20 ms, so the first kill lands in training or just after it; the leader's lands mid-merge
    assert result["kills"][1]["target_open"], result["kills"]
    assert len(result["lease_tokens"]) >= 2, result   # the leader's kill handed the lease on, with a larger token
    assert result["batches_applied_twice"] == 0, result   # found by this test; fixed with test_learners' tests
    # no collapse: a learner that forked the served line (a second bootstrap, found by this test) left it at
    # 0.50-0.68 against 0.92-0.95, a difference of -0.24 or worse. Whether the learners are below one learner
    # is make scale's check, against the median of three runs of it: here one run of each, and one run of one
    # learner on this short stream spreads 0.907-0.937, so the group measured -0.076 once (CI, 2026-12-06)
    # with nothing wrong. -0.12 sits between that noise and the collapse.
    assert result["against_one_learner"]["difference"] > -0.12, result["against_one_learner"]
