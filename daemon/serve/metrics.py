"""Prometheus metrics of ``filial serve``, in their own registry (several servers per process in
tests; no global state), served at ``/metrics``.

Request figures are counted by the HTTP layer as requests pass; the loader's state (version, zoo
size, swaps, refusals, readiness) is read from it at each scrape, so the two can never disagree.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

FAILURE_REASONS = ("bad_request", "too_large", "not_ready", "stopping", "error")


class _LoaderCollector:
    """The loader's figures, read at scrape time."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def describe(self):
        return []

    def collect(self):
        stats = self.loader.stats()
        yield GaugeMetricFamily("filial_serve_ready", "1 when a verified served version is loaded",
                                value=1.0 if stats.ready else 0.0)
        yield GaugeMetricFamily("filial_serve_version", "Served version in use (0: none yet)",
                                value=float(stats.version or 0))
        yield GaugeMetricFamily("filial_serve_zoo_size", "Models in the snapshot requests run on, the served "
                                "one included", value=float(stats.zoo_size))
        yield CounterMetricFamily("filial_serve_swaps", "Snapshots swapped in (served versions and member "
                                  "changes)", value=float(stats.swaps))
        yield CounterMetricFamily("filial_serve_refusals", "Versions and members refused (verification failed, "
                                  "or they do not build); the previous ones kept serving", value=float(stats.refusals))
        yield CounterMetricFamily("filial_serve_skipped_versions", "Served versions ignored (another one pinned, "
                                  "or expired before they were loaded)", value=float(stats.skipped))


class ServeMetrics:
    def __init__(self, loader: Any) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_LoaderCollector(loader))
        self.request_seconds = Histogram("filial_serve_request_seconds", "POST /predict answered, from the "
                                         "body read to the response, by mode", ["mode"], buckets=_LATENCY,
                                         registry=r)
        self.failed = Counter("filial_serve_failed_requests", "POST /predict not answered with a prediction, by "
                              "reason (" + ", ".join(FAILURE_REASONS) + ")", ["reason"], registry=r)
        for reason in FAILURE_REASONS:
            self.failed.labels(reason)  # present from the start: rate() needs the zero
        self.batch_requests = Histogram("filial_serve_batch_requests", "Requests per model call (micro-batching: "
                                        "_sum / _count > 1 when concurrent requests share calls)",
                                        buckets=_SIZES, registry=r)
        self.batch_rows = Histogram("filial_serve_batch_rows", "Rows per model call", buckets=_SIZES, registry=r)
        self.model_seconds = Histogram("filial_serve_model_seconds", "Wall time of one model call",
                                       buckets=_LATENCY, registry=r)
        self.publish_to_served = Histogram("filial_serve_publish_to_served_seconds", "From a version's publish "
                                           "(manifest created_at) to its swap into the served snapshot",
                                           buckets=_LATENCY, registry=r)

    def on_batch(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.model_seconds.observe(seconds)

    def observe_swap(self, version: int, published_at: float | None) -> None:
        """The loader's ``on_swap``: a served version swapped in, ``published_at`` (epoch seconds) after
        its publish (clocks of two hosts when the daemon runs elsewhere)."""
        if published_at is not None:
            self.publish_to_served.observe(max(time.time() - published_at, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
