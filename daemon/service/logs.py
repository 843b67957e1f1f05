"""Logging setup: readable lines for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Mapping

from daemon.service.settings import Settings, unknown_variables


class JsonFormatter(logging.Formatter):
    """``ts`` is RFC 3339 / ISO 8601 in UTC with milliseconds (``2026-11-23T21:41:54.123Z``): sortable,
    unambiguous across hosts and time zones, fine enough to order the lines of one batch."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        payload = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname,
                   "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kafka", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_settings(settings: Settings, environ: Mapping[str, str]) -> None:
    """At start: the settings in effect, secrets masked, and a warning per ``FILIAL_*`` variable no
    setting reads (with the nearest valid name)."""
    log = logging.getLogger("filial")
    log.info("settings (secrets masked): %s", json.dumps(settings.public_dict()))
    for warning in unknown_variables(environ):
        log.warning("%s", warning)
