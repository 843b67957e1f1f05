"""Logs a pipeline can use: JSON lines with an unambiguous time; the settings in effect at start,
secrets masked; misspelt variables named."""

from __future__ import annotations

import json
import logging
import re

from daemon.service.logs import JsonFormatter, log_settings
from daemon.service.settings import load_settings


def test_json_lines_carry_utc_time_with_milliseconds():
    record = logging.LogRecord("filial", logging.INFO, __file__, 1, "batch %s", ("b1",), None)
    record.created = 1795475572.1234
    line = json.loads(JsonFormatter().format(record))
    assert line == {"ts": "2026-11-23T23:12:52.123Z", "level": "INFO", "logger": "filial", "message": "batch b1"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


def test_settings_are_logged_once_with_secrets_masked(caplog):
    settings = load_settings(signing_key="very-secret", redis_password="also-secret", kl_threshold=0.3)
    with caplog.at_level(logging.INFO, logger="filial"):
        log_settings(settings, {"FILIAL_KL_TRESHOLD": "0.3"})
    text = caplog.text
    assert "very-secret" not in text and "also-secret" not in text
    logged = json.loads(caplog.records[0].getMessage().split(": ", 1)[1])
    assert logged["learner"]["kl_threshold"] == 0.3 and logged["publish"]["signing_key"] == "**********"
    assert "did you mean FILIAL_KL_THRESHOLD?" in caplog.records[1].getMessage()
