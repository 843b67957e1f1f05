"""Prometheus metrics of one service, in their own registry (several services per process in
tests; no global state). Served at ``/metrics`` by daemon.service.health.

Rates are left to PromQL (``rate(filial_batches_total[1m])`` = batches per second).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter("filial_batches", "Batches applied by the engine", ["slice"], registry=r)
        self.samples = Counter("filial_samples", "Samples (rows) applied by the engine", ["slice"], registry=r)
        self.duplicates = Counter("filial_duplicate_batches", "Replayed batches skipped (already applied)",
                                  registry=r)
        self.decode_failures = Counter("filial_decode_failures", "Messages dead-lettered, by reason "
                                       "(the decoder's, incompatible, engine_error, crash_loop)", ["reason"],
                                       registry=r)
        self.lag = Gauge("filial_consumer_lag", "Messages behind the log end", ["partition"], registry=r)
        self.kl = Gauge("filial_kl", "Last KL(batch || served reference) per slice", ["slice"], registry=r)
        self.prequential = Gauge("filial_prequential_accuracy", "Test-then-train accuracy of the served model "
                                 "per slice (cumulative)", ["slice"], registry=r)
        self.decisions = Counter("filial_drift_decisions", "Per-batch decisions by action", ["action"], registry=r)
        self.children = Gauge("filial_children", "Children in the model tree by status", ["status"], registry=r)
        self.slices_dropped = Counter("filial_slices_dropped", "Slices whose buffers and labels were dropped: "
                                      "evicted (max_slices) or superseded (a newer slice relabelled its inputs)",
                                      ["reason"], registry=r)
        self.merges = Counter("filial_merges", "Merges planned, by result", ["result"], registry=r)
        self.publish_seconds = Histogram("filial_publish_seconds", "Time from publish request to the version "
                                         "being written (includes retries through outages)", ["reason"],
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                  120, 300), registry=r)
        self.publish_failures = Counter("filial_publish_failures", "Failed publish attempts (each is retried)",
                                        ["reason"], registry=r)
        self.publish_pending = Gauge("filial_publish_pending", "Publishes queued or being retried", registry=r)
        self.leader = Gauge("filial_leader", "1 while this learner holds the merge lease (publishes the served line)",
                            registry=r)
        self.lease_token = Gauge("filial_lease_token", "Fencing token of the merge lease when this learner last held it",
                                 registry=r)
        self.served_version = Gauge("filial_served_version", "Version the engine serves", registry=r)
        self.checkpoint_age = Gauge("filial_last_checkpoint_age_seconds", "Seconds since the last durable "
                                    "checkpoint (offsets are committed only up to it)", registry=r)
        self.checkpoint_failures = Counter("filial_checkpoint_failures", "Checkpoints that could not be saved",
                                           registry=r)
        self.dependency_up = Gauge("filial_dependency_up", "1 when the dependency answered its last probe",
                                   ["dependency"], registry=r)
        self.log_resets = Counter("filial_partition_log_resets", "Partitions whose broker log was found reset "
                                  "(e.g. a memory-only broker restarted)", ["partition"], registry=r)
        self.served_accuracy = Gauge("filial_served_accuracy", "Held-out accuracy of the served version per "
                                     "slice", ["slice"], registry=r)
        self.served_forgetting = Gauge("filial_served_forgetting", "Accuracy of the served version on a slice when "
                                       "it was last learned minus now (continual-learning forgetting)", ["slice"],
                                       registry=r)
        self.served_average_accuracy = Gauge("filial_served_average_accuracy", "Mean held-out accuracy of the "
                                             "served version over every slice seen", registry=r)
        self.served_bwt = Gauge("filial_served_bwt", "Backward transfer of the served version (minus the mean "
                                "forgetting of the slices it learned earlier)", registry=r)
        self.pending_age = Gauge("filial_oldest_pending_message_age_seconds", "Seconds the oldest message fetched "
                                 "and not yet applied or dead-lettered has waited (0: none in hand)", registry=r)
        self.engine_errors = Counter("filial_engine_errors", "Attempts to apply a batch that raised (each undone; "
                                     "the second failure quarantines the batch)", registry=r)
        self.stage_seconds = Histogram("filial_stage_seconds", "Seconds per batch spent in each stage of the "
                                       "consume path: poll, decode, checkpoint (the service's) and the engine's "
                                       "(daemon.engine.stages)", ["stage"],
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                2.5, 5), registry=r)
        self.merge_cpu_seconds = Counter("filial_merge_cpu_seconds", "CPU seconds of the merge job's thread (merge, "
                                         "gate, releases, zoo members; torch's intra-op workers count only when "
                                         "torch runs one thread)", registry=r)
        self.process_cpu_seconds = Gauge("filial_process_cpu_seconds", "CPU seconds of the whole process (user + "
                                         "system): with filial_merge_cpu_seconds, the merge job's share", registry=r)
        self.process_cpu_seconds.set_function(time.process_time)
        self._last_checkpoint: float | None = None
        self.checkpoint_age.set_function(self._checkpoint_age)

    def served_quality(self, accuracy: dict[str, float | None], continual: dict[str, Any] | None) -> None:
        """The newest served version's held-out figures (labelled by slice, never by version: the
        label sets stay bounded)."""
        for name, value in accuracy.items():
            self.served_accuracy.labels(name).set(float("nan") if value is None else value)
        if continual is None:
            return
        for name, value in continual.get("forgetting", {}).items():
            self.served_forgetting.labels(name).set(value)
        for name in continual.get("learned", []):
            self.served_forgetting.labels(name).set(0.0)
        nan = float("nan")
        average, bwt = continual.get("average_accuracy"), continual.get("bwt")
        self.served_average_accuracy.set(nan if average is None else average)
        self.served_bwt.set(nan if bwt is None else bwt)

    def forget_slice(self, name: str) -> None:
        """The engine evicted a slice (``learner.max_slices``) or a newer slice superseded it: its labels
        go too, so they stay bounded."""
        for metric in (self.batches, self.samples, self.kl, self.prequential, self.served_accuracy,
                       self.served_forgetting):
            try:
                metric.remove(name)
            except KeyError:  # never set for this slice
                pass

    def stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def checkpoint_saved(self) -> None:
        self._last_checkpoint = time.monotonic()

    def _checkpoint_age(self) -> float:
        return float("nan") if self._last_checkpoint is None else time.monotonic() - self._last_checkpoint

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
