"""``filial bench throughput`` on a tiny profile, through the real path: embedded broker and Redis, the
real service, the raw loop, keep cost, ingest and follower latency, each cut to a few iterations.
The figures are not judged here (2 shared cores); the JSON's shape and the raw loop's fidelity are."""

from __future__ import annotations

import math

from benchmarks import ingest, throughput
from daemon.cli import BENCHES, build_parser

TINY = ["--batches", "9", "--rows", "50", "--streams", "drift", "--repeats", "1", "--publishes", "2",
        "--keep-cost-batches", "2", "--ingest-messages", "20", "--ingest-repeats", "1"]
KEYS = ("ratio_to_raw_no_merge", "ratio_to_raw", "keep_cost_ratio_16_children", "merge_cpu_share",
        "ingest_mb_per_s", "follower_p99_ms", "stages", "runs", "consume_mb_per_s", "targets")
RUN_KEYS = ("samples_per_s", "raw_samples_per_s", "ratio_to_raw", "cpu_seconds", "rss_mb", "decisions",
            "merge_cpu_share", "optimizer_steps", "stages")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_a_tiny_profile_reports_every_key_and_replays_the_daemons_steps(tmp_path):
    args = build_parser().parse_args(["bench", "throughput", *TINY, "--out-dir", str(tmp_path)])
    result = args.bench_main(args)

    assert all(key in result for key in KEYS), set(KEYS) - set(result)
    for key in ("ratio_to_raw_no_merge", "ratio_to_raw", "keep_cost_ratio_16_children", "ingest_mb_per_s"):
        assert _positive(result[key]), (key, result[key])
    assert 0 <= result["merge_cpu_share"] < 1
    assert set(result["follower_p99_ms"]) == {"1M", "10M"} and all(map(_positive, result["follower_p99_ms"].values()))
    assert set(result["stages"]) >= {"poll", "decode", "observe", "train_served", "other"}
    assert set(result["runs"]) == {"drift/never", "drift/default"}
    for run in result["runs"].values():
        assert all(key in run for key in RUN_KEYS), set(RUN_KEYS) - set(run)
        assert _positive(run["samples_per_s"]) and _positive(run["raw_samples_per_s"])
        steps = run["optimizer_steps"]
        assert steps["daemon"] > 0 and steps["raw"] == steps["daemon"]   # the same optimizer steps
        assert run["raw"]["steps_from_calls"] == steps["daemon"]            # epochs x ceil(rows / batch) each
        assert sum(run["decisions"].values()) == 9 and run["dead_lettered"] == 0
    confluent = result["consume_mb_per_s"]["confluent_kafka"]["consume"]
    if ingest.confluent_problem() is None:    # the bench extra: measured on the same topic
        assert _positive(confluent)
    else:                                     # without it: null, and the reason, no crash
        assert confluent is None and "not installed" in result["confluent_kafka"]
    assert (tmp_path / "throughput.json").exists()


def test_registered_as_a_bench():
    assert "throughput" in BENCHES
    assert throughput._params("10M") == 10_000_000 and throughput._params("1m") == 1_000_000
