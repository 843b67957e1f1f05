"""Capped streams of what the daemon did (metrics, drift decisions, merges) and the tree snapshot.

These are observability records, not versions: bounded with ``MAXLEN ~`` so they never grow
without limit, and written best-effort by the service (a Redis outage must not stop ingest).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from zoo_store.keys import Keys
from zoo_store.models import utc_now


class Telemetry:
    def __init__(self, client: redis.Redis, keys: Keys, maxlen: int = 10_000) -> None:
        self.client = client
        self.keys = keys
        self.maxlen = maxlen

    def _append(self, key: str, field: str, record: dict[str, Any]) -> None:
        record = {"at": utc_now(), **record}
        self.client.xadd(key, {field: json.dumps(record)}, maxlen=self.maxlen, approximate=True)

    def metric(self, record: dict[str, Any]) -> None:
        self._append(self.keys.metrics, "metric", record)

    def decision(self, record: dict[str, Any]) -> None:
        self._append(self.keys.decisions, "decision", record)

    def merge(self, record: dict[str, Any]) -> None:
        self._append(self.keys.merges, "merge", record)

    def save_tree(self, tree: dict[str, Any]) -> None:
        self.client.set(self.keys.tree, json.dumps(tree))

    def tree(self) -> dict[str, Any] | None:
        raw = self.client.get(self.keys.tree)
        return json.loads(raw) if raw else None

    def _recent(self, key: str, field: bytes, count: int) -> list[dict[str, Any]]:
        return [json.loads(fields[field]) for _, fields in reversed(self.client.xrevrange(key, count=count))]

    def recent_decisions(self, count: int = 20) -> list[dict[str, Any]]:
        return self._recent(self.keys.decisions, b"decision", count)

    def recent_merges(self, count: int = 20) -> list[dict[str, Any]]:
        return self._recent(self.keys.merges, b"merge", count)

    def recent_metrics(self, count: int = 20) -> list[dict[str, Any]]:
        return self._recent(self.keys.metrics, b"metric", count)
