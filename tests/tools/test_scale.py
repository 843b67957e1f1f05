"""The small scale test CI runs (``make scale`` runs the full one: 3 learners, 12 partitions): two
``filial run`` learners in one group on four partitions, one SIGKILLed mid-training and the leader
mid-merge, both restarted; every batch applied once across their checkpoints, versions contiguous,
each published by the lease holder of its time with tokens that never decrease, the served accuracy
not below one learner's on the same stream (tools/scale.py)."""

from __future__ import annotations

import argparse

import pytest

from tools import scale

# Two bugs this test found, each with its own strict-xfail test in tests/daemon/service/test_learners.py.
# Until they are fixed the test asserts everything else and reports them as an expected failure.
KNOWN = {"batches_applied_twice": "a partition that moves after a checkpoint whose commit was lost is applied "
                                  "again (test_a_partition_moves_after_a_checkpoint_whose_commit_was_lost)",
         "accuracy": "a fresh learner that takes the lease publishes a second bootstrap and the others stay on the "
                     "old line (test_a_fresh_learner_that_takes_the_lease_learns_on_from_the_served_line)"}


def test_two_learners_survive_sigkills_and_apply_every_batch_once(tmp_path):
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    args = parser.parse_args(["--learners", "2", "--partitions", "4", "--slices", "4", "--batches", "80",
                              "--rate", "10", "--settle", "10", "--out-dir", str(tmp_path)])
    result = scale.main(args)
    assert result["batches_lost"] == 0, result
    assert result["version_gaps"] == 0 and result["duplicate_versions"] == 0 and result["events_without_data"] == 0
    assert not result["leader_mismatches"] and not result["token_decreases"], result
    assert [k["target"] for k in result["kills"]] == ["train", "merge"], result["kills"]
    # a batch trains in ~20 ms, so the first kill lands in training or just after it; the leader's lands mid-merge
    assert result["kills"][1]["target_open"], result["kills"]
    assert len(result["lease_tokens"]) >= 2, result   # the leader's kill handed the lease on, with a larger token
    failed = [k for k in KNOWN if not result["checks"][k]]
    if failed:
        pytest.xfail("; ".join(f"{k} ({result[k]}): {KNOWN[k]}" for k in failed))
