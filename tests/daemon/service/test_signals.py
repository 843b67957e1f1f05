"""Stop signals cannot deadlock: the handler does nothing, a watcher thread stops the service; a
second signal stops faster and still loses nothing (daemon/service/signals.py; README, "What happens
when something fails").

The randomized test runs the real handler and the real Service stop path ``RUNS`` times in this
process (one set of embedded servers, a service with a cheap startup), so it costs under a minute, not
``RUNS`` ``filial run`` starts; two real ``filial run`` processes are stopped with double signals as well.
"""

from __future__ import annotations

import faulthandler
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

from daemon.service.service import Service
from daemon.service.signals import StopSignals, stop_service_on_signals
from tests.helpers import produce_tabular, service_settings, wait_until
from zoo_store.checkpoints import CheckpointStore
from zoo_store.connection import connect
from zoo_store.keys import Keys

HANG_BOUND_SECONDS = 45  # a run that has not returned by then is hung: abort with every thread's stack
RUNS = 30  # random signal moments per suite run (50 took 83 s of the suite's 15-minute budget)


def _signal_self(*signums: int) -> None:
    for signum in signums:
        os.kill(os.getpid(), signum)


def test_signals_arriving_while_the_main_thread_holds_the_events_lock_cannot_deadlock():
    # the seen hang: a handler calling Event.set() re-entered while the main thread held that Event's
    # Condition lock. Here the main thread holds it while three signals arrive; the handler must not need it.
    stop, counts = threading.Event(), []
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # SIG_IGN under nohup

    def on_signal(signum, count):
        counts.append((signum, count))
        stop.set()  # on the watcher thread: waits for the lock instead of deadlocking the main thread

    with StopSignals(on_signal):
        with stop._cond:  # noqa: SLF001 - the lock Event.set takes, held as when the first handler ran
            _signal_self(signal.SIGTERM, signal.SIGINT, signal.SIGTERM)
            for _ in range(100):  # bytecodes run here: the Python-level handlers run, and return
                time.sleep(0.001)
        assert stop.wait(10)
        assert wait_until(lambda: len(counts) == 3, timeout=10)
    assert counts == [(signal.SIGTERM, 1), (signal.SIGINT, 2), (signal.SIGTERM, 3)]
    assert {s: signal.getsignal(s) for s in before} == before  # restored


def test_a_process_that_only_exits_afterwards_ignores_late_stop_signals():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignals(lambda signum, count: None, ignore_after=True):
            pass
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)  # a late SIGTERM cannot kill it (-15)
        _signal_self(signal.SIGTERM)   # ignored: the test goes on
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_double_and_triple_signals_at_random_moments_stop_cleanly_and_lose_nothing(kafka, redis_server, unique):
    settings = service_settings(kafka.address, redis_server.address, unique, health_port=-1,
                                kafka_session_timeout_ms=2000,  # heartbeat 0.5 s: a consumer closes in ~0.5 s
                                checkpoint_every_batches=1000)  # only the stop's checkpoint: that is under test
    kafka.create_topics({settings.kafka.topic: 1, settings.kafka.dead_letter_topic: 1})
    store = CheckpointStore(connect(redis_server.address), Keys(unique))
    rng = random.Random(11)
    durable, produced = 0, 0
    for run in range(RUNS):
        produce_tabular(kafka.address, settings.kafka.topic, "plain", 2, "b", rows=32, start=produced)
        produced += 2
        service = Service(settings)
        # the first signal at a random moment once this run applies batches (signals during the group
        # join are left to the `filial run` test: an aborted join makes the next one slow on this broker)
        delays = [rng.uniform(0, 0.3)] + [rng.uniform(0.02, 0.2) for _ in range(rng.choice((1, 2)))]
        signums = [rng.choice((signal.SIGTERM, signal.SIGINT)) for _ in delays]

        def send():
            wait_until(lambda: service.engine.counters.batches > durable, timeout=20, every=0.02)
            for delay, signum in zip(delays, signums):
                time.sleep(delay)
                _signal_self(signum)

        sender = threading.Thread(target=send, daemon=True)
        faulthandler.dump_traceback_later(HANG_BOUND_SECONDS, exit=True)
        try:
            with stop_service_on_signals(service) as watcher:
                sender.start()
                service.run()  # the main thread, as in `filial run`
                sender.join()
                # POSIX does not queue a signal already pending: two close together may arrive as one,
                # so count at least two (apart by >= 20 ms they do not merge in practice), not exactly
                assert wait_until(lambda: watcher.received >= 2, timeout=10), (run, watcher.received)
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert service.stop_event.is_set() and service.hurry.is_set(), run
        saved = store.load()
        meta = saved[0] if saved else {"counters": {"batches": 0}, "ledger": {}}
        applied = meta["counters"]["batches"]
        next_offset = max([p["next_offset"] for p in meta["ledger"].values()] or [0])
        # the stop's checkpoint holds everything this run applied, and each record once
        assert applied >= service.engine.counters.batches and applied >= durable, (run, applied, durable)
        assert next_offset == applied, (run, meta["ledger"])
        versions = service.versions.versions(settings.publish.line)
        # contiguous (retention drops the oldest), and the checkpoint serves one of them or none yet
        assert versions == list(range(versions[0], versions[0] + len(versions))) if versions else True, (run, versions)
        assert (meta.get("served_version") or 0) <= (versions[-1] if versions else 0), (run, meta.get("served_version"))
        durable = applied
    # a last run with one signal once everything is read: every batch applied exactly once over all runs
    service = Service(settings)
    with stop_service_on_signals(service):
        threading.Thread(target=lambda: (wait_until(lambda: service.engine.counters.batches >= produced
                                                    and service.idle.is_set()),
                                         _signal_self(signal.SIGTERM)), daemon=True).start()
        service.run()
    assert store.load()[0]["counters"]["batches"] == produced and durable <= produced


def _start_run(tmp_path, kafka, redis_server, name: str) -> tuple[subprocess.Popen, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILIAL_")}
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--kafka-bootstrap", kafka.address,
                                 "--redis-url", redis_server.address, "--topic", f"{name}.in",
                                 "--dead-letter-topic", f"{name}.dlq", "--group-id", name, "--redis-prefix", name,
                                 "--health-port", "-1", "--kafka-session-timeout-ms", "2000",
                                 "--model-family", "tabular_mlp", "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log


def test_filial_run_stops_on_a_double_signal(tmp_path, kafka, redis_server, unique):
    # close together, but not back to back: the kernel merges a second SIGTERM that arrives while the first
    # is still pending (standard signals are not queued), and then only one is ever delivered
    for name, gap, signums in ((f"{unique}a", 0.02, (signal.SIGTERM, signal.SIGTERM)),
                               (f"{unique}b", 0.3, (signal.SIGINT, signal.SIGTERM, signal.SIGINT))):
        kafka.create_topics({f"{name}.in": 1, f"{name}.dlq": 1})
        produce_tabular(kafka.address, f"{name}.in", "plain", 4, "b", rows=32)
        proc, log = _start_run(tmp_path, kafka, redis_server, name)
        try:
            assert wait_until(lambda: "consuming" in log.read_text() or proc.poll() is not None, timeout=90)
            assert proc.poll() is None, log.read_text()
            for signum in signums:
                proc.send_signal(signum)
                time.sleep(gap)
            assert proc.wait(timeout=HANG_BOUND_SECONDS) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert "stopping faster" in text and "stopped: " in text, text
        assert not _filial_tracebacks(text), text


def _filial_tracebacks(log_text: str) -> list[str]:
    """Log records of filial's own loggers that carry a traceback. kafka-python may log one of its own
    while a stop cancels a metadata refresh in flight ("Error closing coroutine for cancelled task"):
    its internals, after which filial still stops cleanly (exit 0, last checkpoint written)."""
    records = re.split(r"\n(?=\d\d:\d\d:\d\d )", log_text)
    return [r for r in records if "Traceback" in r and r.split()[2:3] and r.split()[2].startswith("filial")]


def test_a_hurried_stop_abandons_queued_publishes_instead_of_draining_them():
    # Redis unreachable: the job retries forever; without the hurry, stop would wait out the 600 s drain
    import redis

    from daemon.service.publisher import PublishAbandoned, Publisher, PublishJob
    from zoo_store.versions import VersionStore

    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    publisher = Publisher(VersionStore(unreachable, Keys("hurry")), backoff_cap=0.5).start()
    job = publisher.submit(PublishJob("main", "merge", b"w", "merge:1:x", {"architecture": {}}))
    hurry = threading.Event()
    stopper = threading.Thread(target=publisher.stop, args=(600.0,), kwargs={"hurry": hurry}, daemon=True)
    stopper.start()
    assert wait_until(lambda: publisher.pending == 1, timeout=10)  # draining: still waiting for the job
    hurry.set()
    stopper.join(timeout=HANG_BOUND_SECONDS)
    assert not stopper.is_alive()
    assert isinstance(job.exception(timeout=10), PublishAbandoned)
