"""No single message stops the service (issue 11), on the real embedded broker and Redis: a batch the
engine raises on is quarantined as engine_error, batches the served model cannot take are
incompatible, an oversized message is dead-lettered as a reference, a batch that kills the
process is dead-lettered as crash_loop at the second consecutive crash (a real SIGKILL, from the
failpoints), and a loop held on one message fails /healthz."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import torch
from kafka import KafkaConsumer, KafkaProducer

from consumers.wire import encode_batch
from daemon.service.failpoints import Failpoints
from daemon.service.service import Service
from tests.helpers import produce_tabular, run_in_thread, service_settings, wait_until
from zoo_store.connection import connect
from zoo_store.keys import Keys


def _tokens(i: int, rows: int = 32, top: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randint(0, top, (rows, 12), generator=g)
    return x, x[:, 0] % 10


def _send(producer: KafkaProducer, topic: str, value: bytes, headers) -> None:
    producer.send(topic, value=value, headers=headers).get(timeout=20)


def _dead_letters(bootstrap: str, topic: str, expect: int) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000, enable_auto_commit=False)
    records = []
    for _ in range(20):
        records += list(consumer)
        if len(records) >= expect:
            break
    consumer.close()
    return records


def _headers(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def test_poison_incompatible_and_oversized_messages_are_dead_lettered_and_the_stream_goes_on(
        kafka, redis_server, unique):
    settings = service_settings(kafka.address, redis_server.address, unique, model_family="sequence_gru",
                                limits={"max_message_bytes": 20_000})
    topic, dlq = settings.kafka.topic, settings.kafka.dead_letter_topic
    kafka.create_topics({topic: 1, dlq: 1})
    producer = KafkaProducer(bootstrap_servers=kafka.address, max_request_size=1_000_000)
    seq = lambda i, **kw: encode_batch(*_tokens(i, **kw), "s", "sequence", f"g-{i}")  # noqa: E731
    for i in range(3):
        _send(producer, topic, *seq(i))
    # token ids beyond the served model's vocabulary (256): the embedding raises, twice
    poison_value, poison_headers = encode_batch(*_tokens(3, top=5000), "s", "sequence", "poison")
    _send(producer, topic, poison_value, poison_headers)
    tab_value, tab_headers = encode_batch(torch.rand(32, 20), torch.arange(32) % 10, "s", "tabular", "tab")
    _send(producer, topic, tab_value, tab_headers)
    _send(producer, topic, *encode_batch(torch.randint(0, 50, (32, 13)), torch.arange(32) % 10, "s", "sequence",
                                         "wide"))  # 13 tokens a row; the served model was built on 12
    big_value, big_headers = seq(5, rows=400)  # 400 x 12 int64 tokens: 38 kB > the 20 kB limit
    _send(producer, topic, big_value, big_headers)
    for i in range(6, 9):
        _send(producer, topic, *seq(i))
    producer.close()

    service = Service(settings)
    thread = run_in_thread(service)
    try:
        assert wait_until(lambda: service.engine.counters.batches + service.dead_lettered >= 10, timeout=180)
    finally:
        service.stop()
        thread.join(60)
    assert service.engine.counters.batches == 6 and service.dead_lettered == 4
    assert service.ledger.next_offsets() == {f"{topic}:0": 10}  # every offset advanced, through the checkpoint
    meta = json.loads(connect(redis_server.address).get(Keys(unique).checkpoint_meta))
    assert meta["applied_offsets"] == {f"{topic}:0": 10}
    exposition = service.metrics.exposition().decode()
    assert "filial_engine_errors_total 2.0" in exposition  # the first attempt and its one retry

    letters = {_headers(r)["filial-source"]: r for r in _dead_letters(kafka.address, dlq, 4)}
    assert sorted(letters) == [f"{topic}:0:{o}" for o in (3, 4, 5, 6)]
    poison = _headers(letters[f"{topic}:0:3"])
    assert poison["filial-reason"] == "engine_error" and poison["batch_id"] == "poison"
    assert poison["filial-detail"].startswith("IndexError: ")
    assert letters[f"{topic}:0:3"].value == poison_value  # small enough: the payload goes with it
    for offset in (4, 5):
        assert _headers(letters[f"{topic}:0:{offset}"])["filial-reason"] == "incompatible"
    big = letters[f"{topic}:0:6"]
    big_h = _headers(big)
    assert big_h["filial-reason"] == "too_large" and big.value in (b"", None)
    assert big_h["filial-payload"] == "omitted" and int(big_h["filial-size"]) == len(big_value)
    assert big_h["filial-sha256"] == hashlib.sha256(big_value).hexdigest() and big_h["batch_id"] == "g-5"


def test_a_restart_after_a_dead_letter_with_a_batch_id_resumes_without_a_log_reset(kafka, redis_server, unique):
    settings = service_settings(kafka.address, redis_server.address, unique)
    topic = settings.kafka.topic
    kafka.create_topics({topic: 1, settings.kafka.dead_letter_topic: 1})
    produce_tabular(kafka.address, topic, "a", 2, "a")
    producer = KafkaProducer(bootstrap_servers=kafka.address)
    _send(producer, topic, b"\x00garbage", [("slice", b"a"), ("data_type", b"tabular"), ("schema", b"1"),
                                            ("batch_id", b"junk-1")])  # the last record before the restart
    producer.close()
    first = Service(settings)
    thread = run_in_thread(first)
    assert wait_until(lambda: first.engine.counters.batches + first.dead_lettered == 3, timeout=120)
    first.stop()
    thread.join(60)
    produce_tabular(kafka.address, topic, "a", 1, "a", start=2)
    second = Service(settings)
    thread = run_in_thread(second)
    try:  # the record at the applied offset is a dead letter: known, so not taken for a reset log
        assert wait_until(lambda: second.engine.counters.batches == 3, timeout=120)
    finally:
        second.stop()
        thread.join(60)
    # a reset would re-read the partition: the two batches skipped by id, the garbage dead-lettered again
    assert second.engine.counters.duplicates_skipped == 0 and second.dead_lettered == 0
    assert len(_dead_letters(kafka.address, settings.kafka.dead_letter_topic, 1)) == 1


def test_a_restart_reads_back_the_dead_letters_a_crash_interrupted_and_sends_only_the_missing(
        kafka, redis_server, unique):
    """A process that dies during a dead letter's send cannot know whether the broker appended it. Here the
    earlier life noted two sends and died before recording either: the broker had one of them. The
    restart reads the dead-letter topic back, passes the delivered one over and sends the other: each
    poison message is in the dead-letter topic exactly once."""
    from consumers.connection import KafkaConnection
    from consumers.dead_letter import DeadLetterProducer
    from zoo_store.checkpoints import DeadLetterLog

    settings = service_settings(kafka.address, redis_server.address, unique)
    topic, dlq = settings.kafka.topic, settings.kafka.dead_letter_topic
    kafka.create_topics({topic: 1, dlq: 1})
    produce_tabular(kafka.address, topic, "a", 2, "a")
    producer = KafkaProducer(bootstrap_servers=kafka.address)
    for n in (1, 2):
        _send(producer, topic, b"\x00garbage", [("slice", b"a"), ("data_type", b"tabular"), ("schema", b"1"),
                                                ("batch_id", f"junk-{n}".encode())])
    producer.close()
    produce_tabular(kafka.address, topic, "a", 1, "a", start=2)
    delivered, lost_in_flight = f"{topic}:0:2", f"{topic}:0:3"
    notes = DeadLetterLog(connect(redis_server.address), Keys(settings.redis.prefix))
    now = int(time.time() * 1000)
    notes.sending(delivered, now)
    notes.sending(lost_in_flight, now)
    letters = DeadLetterProducer(KafkaConnection(bootstrap=kafka.address), dlq)
    letters.send(b"\x00garbage", [], "bad_bytes", "the earlier life's send", delivered)   # acknowledged, never recorded
    letters.close()
    service = Service(settings)
    thread = run_in_thread(service)
    try:
        assert wait_until(lambda: service.engine.counters.batches == 3, timeout=120)
    finally:
        service.stop()
        thread.join(60)
    assert service.dead_lettered == 1   # only the one the broker never had
    sources = [_headers(r)["filial-source"] for r in _dead_letters(kafka.address, dlq, 2)]
    assert sorted(sources) == [delivered, lost_in_flight]
    assert notes.unsure() == {}


class _HangOn(Failpoints):
    """A failpoint that holds the engine's next batch of one slice until released (a hung native call)."""

    def __init__(self, slice_name: str) -> None:
        self.slice_name = slice_name
        self.reached = threading.Event()
        self.release = threading.Event()

    def applying(self, slice_name: str) -> None:
        if slice_name == self.slice_name:
            self.reached.set()
            self.release.wait(120)


def test_a_loop_held_on_one_message_fails_healthz_with_the_reason(kafka, redis_server, unique):
    settings = service_settings(kafka.address, redis_server.address, unique, health_stall_seconds=2.0)
    topic = settings.kafka.topic
    kafka.create_topics({topic: 1, settings.kafka.dead_letter_topic: 1})
    produce_tabular(kafka.address, topic, "a", 2, "a")
    produce_tabular(kafka.address, topic, "hang", 1, "hang")
    hang = _HangOn("hang")
    service = Service(settings, failpoints=hang)
    thread = run_in_thread(service)

    def healthz() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(service.health_server.url + "/healthz", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        assert hang.reached.wait(120)
        assert wait_until(lambda: (healthz()[1]["problems"] or [""])[0].startswith("stalled"), timeout=60)
        assert healthz()[0] == 503
        body = healthz()[1]
        assert body["problems"][0].startswith(f"stalled: message {topic}:0:2 in hand for ")
        assert body["problems"][0].endswith("(applying (attempt 1))")
        assert body["in_hand"]["message"] == f"{topic}:0:2" and body["in_hand"]["held_s"] >= 2.0
        age = [line for line in service.metrics.exposition().decode().splitlines()
               if line.startswith("filial_oldest_pending_message_age_seconds ")]
        assert float(age[0].split()[1]) >= 2.0
        hang.release.set()
        assert wait_until(lambda: service.engine.counters.batches == 3, timeout=60)
        assert wait_until(lambda: healthz()[0] == 200, timeout=10)
        assert healthz()[1]["in_hand"] is None
    finally:
        hang.release.set()
        service.stop()
        thread.join(60)


def _daemon(kafka: str, redis_url: str, name: str, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "daemon.cli", "run", "--kafka-bootstrap", kafka, "--redis-url", redis_url,
            "--topic", f"{name}.in", "--dead-letter-topic", f"{name}.dlq", "--group-id", name,
            "--redis-prefix", name, "--kafka-session-timeout-ms", "6000", "--model-family", "tabular_mlp",
            "--device", "cpu", "--bootstrap-batches", "2", "--bootstrap-epochs", "2", "--bootstrap-accuracy", "0.01",
            "--checkpoint-every-batches", "100", "--checkpoint-every-seconds", "2", "--health-port", "-1", "--backoff-max-seconds", "2"]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)


def test_a_batch_that_kills_the_process_twice_is_dead_lettered_as_crash_loop(kafka, redis_server, unique):
    topic, dlq = f"{unique}.in", f"{unique}.dlq"
    kafka.create_topics({topic: 1, dlq: 1})
    # batches no checkpoint covers before the culprit: re-applied in each life before it comes up again
    produce_tabular(kafka.address, topic, "a", 6, "a")
    producer = KafkaProducer(bootstrap_servers=kafka.address)  # re-read after each crash: dead-lettered once
    _send(producer, topic, b"\x00garbage", [("slice", b"a"), ("data_type", b"tabular"), ("schema", b"1"),
                                            ("batch_id", b"garbage")])
    producer.close()
    produce_tabular(kafka.address, topic, "boom", 1, "boom")  # the failpoint SIGKILLs the process on it
    produce_tabular(kafka.address, topic, "a", 2, "a", start=6)
    env = {**os.environ, "FILIAL_CHAOS_CRASH_SLICE": "boom", "PYTHONPATH": os.getcwd()}
    redis = connect(redis_server.address)
    inflight = Keys(unique).checkpoint_inflight
    for life in (1, 2):  # a real crash at the same batch, each time
        proc = _daemon(kafka.address, redis_server.address, unique, env)
        assert proc.wait(timeout=180) == -signal.SIGKILL, f"life {life} did not crash"
        assert json.loads(redis.get(inflight))["source"] == f"{topic}:0:7"
    proc = _daemon(kafka.address, redis_server.address, unique, env)
    try:
        def applied() -> dict:
            raw = redis.get(Keys(unique).checkpoint_meta)
            return json.loads(raw)["applied_offsets"] if raw else {}

        assert wait_until(lambda: applied().get(f"{topic}:0") == 10, timeout=180)
        assert proc.poll() is None  # the third life went past it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert redis.get(inflight) is None
    letters = [_headers(r) for r in _dead_letters(kafka.address, dlq, 2)]
    assert [(h["filial-reason"], h["filial-source"], h["batch_id"]) for h in letters] == [
        ("bad_bytes", f"{topic}:0:6", "garbage"), ("crash_loop", f"{topic}:0:7", "boom-0")]
    meta = json.loads(redis.get(Keys(unique).checkpoint_meta))
    assert meta["counters"]["batches"] == 8  # the eight good batches, each once
