"""The command line: every subcommand explains itself, and a mistake says what to do (exit 2)."""

from __future__ import annotations

import pytest

from daemon.cli import BENCHES, main


SUBCOMMANDS = [["run"], ["produce"], ["watch"], ["status"], ["demo"], ["bench"]] + [["bench", b] for b in BENCHES]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*words, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: filial " + " ".join(words))
    assert len(out.splitlines()) > 3  # a description and the options, not just a usage line


def test_run_help_lists_every_setting_with_its_environment_name(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--kafka-bootstrap", "--kl-threshold", "--merge-method", "--max-message-bytes"):
        assert flag in out
    assert "FILIAL_" in out


def test_invalid_setting_names_the_field_and_exits_2(capsys):
    assert main(["run", "--merge-method", "median", "--kafka-bootstrap", "127.0.0.1:1",
                 "--redis-url", "redis://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--merge-method" in err and "magmax" in err and "filial run --help" in err


def test_bad_phase_says_how_to_write_one(capsys):
    assert main(["produce", "--kafka-bootstrap", "127.0.0.1:1", "--phase", "rot90=spin:90"]) == 2
    err = capsys.readouterr().err
    assert "unknown transform" in err and "rotate" in err


def test_unreachable_redis_is_one_line_not_a_traceback(capsys):
    assert main(["status", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "Traceback" not in err


def test_run_without_servers_starts_embedded_ones_and_stops_cleanly_on_sigterm(tmp_path):
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("FILIAL_")}
    env.update(FILIAL_HEALTH_PORT="-1", FILIAL_KAFKA_SESSION_TIMEOUT_MS="6000")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while "consuming" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        text = log.read_text()
        assert "consuming" in text, text
        started = re.findall(r"started an embedded server at (\S+)", text)
        assert len(started) == 2, text          # the broker and Redis, each announced with its address
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "received SIGTERM" in log.read_text()
    for address in started:                     # the embedded servers it started are gone
        host, port = address.removeprefix("redis://").split("/")[0].rsplit(":", 1)
        with socket.socket() as probe:
            assert probe.connect_ex((host, int(port))) != 0
