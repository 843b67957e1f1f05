"""``make chaos``: SIGKILL the daemon at random dangerous moments, restart it, then audit Redis.

1. Starts an embedded broker and Redis (this process owns them; the daemon is a subprocess).
2. A producer thread streams a known sequence of tabular batches (scikit-learn digits, three
   slices: as-is and two feature permutations, so there is drift, children and merges), each
   with a ``batch_id`` header ``chaos-<n>``, at ``--rate`` batches per second.
3. ``filial run`` runs as a subprocess with ``FILIAL_CHAOS_TRACE`` (daemon.service.failpoints), so it
   appends ``begin/at/end <phase>`` lines around training a batch, planning a merge, writing a
   version and saving a checkpoint, and ``FILIAL_CHAOS_PAUSE`` holds each "at" point open. For
   each kill a target phase is drawn (train, merge, publish, checkpoint, or any moment), the
   driver waits for that marker and sends SIGKILL. Which moment was actually interrupted is read
   back from the trace after the kill (the last ``begin``/``at`` without its ``end``), not assumed.
4. After the last kill the daemon runs until every produced batch is in a durable checkpoint,
   then is stopped with SIGTERM.
5. The audit reads Redis: the final checkpoint's applied batch ids and batch counter
   (applied = produced ids present; applied twice = batches counted minus distinct ids; lost =
   produced ids absent), and every version: numbers 1..latest without gaps, one publish id each,
   no two versions with the same (reason, parent, weights), and every event's manifest and
   weights present and verified (sha256 + HMAC).

The poison phase: between the valid batches the producer injects, at random (``--poison``, a
share of the batches), messages no engine may apply: ``oversize`` (over the daemon's message
limit, set to 64 KiB here), ``incompatible`` (20 features to a model of 64), ``non_finite``
(NaN) and ``garbage`` (not safetensors), each with a ``batch_id`` ``poison-<kind>-<n>``. The
audit also reads the dead-letter topic: every poison message dead-lettered exactly once, no
valid batch dead-lettered, none applied. No kill lands while the batch that was in flight at the kill
before it is in flight again (the driver waits until the new life has moved past it): the daemon's
crash-loop protection rightly dead-letters a batch in flight at ``crash_loop_after`` consecutive deaths
(README, "What happens when something fails"), and kills drawn at random had built that pattern out of
restarts, which re-apply first the batch the last life died on (one valid batch dead-lettered as
``crash_loop`` in one run of two on 2026-12-07). A thread polls each life's ``/healthz`` every second
(``health_stall_seconds`` fixed at 60): a 503 is a stall (no message applied or dead-lettered for
60 s while one waits). A life that dies without being killed is a crash loop.

The last stdout line is one JSON object; it and the driver's log go to ``<out-dir>/chaos.json``
and ``<out-dir>/chaos.log``. Run: ``python -m tools.chaos`` (``make chaos``).

Over 300 lines: the driver, the kill schedule and the audit belong together, since the audit
checks exactly what the schedule tried to break.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("filial.chaos")

PHASES = ("train", "merge", "publish", "checkpoint")
POISON_KINDS = ("oversize", "incompatible", "non_finite", "garbage")
MESSAGE_LIMIT = 64 * 1024  # the daemon's max_message_bytes here: a valid batch is 17 kB, an oversize one 77 kB
SIGNING_KEY = "chaos-signing-key"
RISKY_POINT = {"train": "batch applied in memory", "merge": "planned and gated, not yet published",
               "publish": "version written, not yet adopted or checkpointed",
               "checkpoint": "checkpoint saved, offsets not yet committed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs to deliver (default 12)")
    parser.add_argument("--batches", type=int, default=600, help="batches to produce (default 600)")
    parser.add_argument("--rows", type=int, default=64, help="rows per batch (default 64)")
    parser.add_argument("--rate", type=float, default=5.0, help="batches per second produced (default 5)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds each risky point is held open")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poison", type=float, default=0.05, help="share of batches followed by a poison message "
                        "(default 0.05)")
    parser.add_argument("--out-dir", default="bench-results")


# --- the stream -------------------------------------------------------------------------------------
def _stream(n: int, rows: int, seed: int):
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data).float() / 16.0
    y = torch.from_numpy(bunch.target).long()
    gen = torch.Generator().manual_seed(seed)
    slices = {"plain": torch.arange(64), "perm1": torch.randperm(64, generator=gen),
              "perm2": torch.randperm(64, generator=gen)}
    names = list(slices)
    for i in range(n):
        name = names[min(i * len(names) // n, len(names) - 1)]
        lo = (i * rows) % (len(y) - rows)
        yield f"chaos-{i}", name, x[lo:lo + rows][:, slices[name]].contiguous(), y[lo:lo + rows].contiguous()


def poison_message(kind: str, slice_name: str, batch_id: str, rows: int, gen) -> tuple[bytes, list]:
    import torch

    from consumers.wire import encode_batch

    y = torch.randint(0, 10, (rows,), generator=gen)
    if kind == "garbage":
        return b"\x00garbage " + batch_id.encode(), [("slice", slice_name.encode()), ("data_type", b"tabular"),
                                                     ("schema", b"1"), ("batch_id", batch_id.encode())]
    if kind == "oversize":
        big = 300
        return encode_batch(torch.rand(big, 64, generator=gen), torch.randint(0, 10, (big,), generator=gen),
                            slice_name, "tabular", batch_id)
    if kind == "incompatible":
        return encode_batch(torch.rand(rows, 20, generator=gen), y, slice_name, "tabular", batch_id)
    x = torch.rand(rows, 64, generator=gen)
    x[0, 0] = float("nan")
    return encode_batch(x, y, slice_name, "tabular", batch_id)


class Producer(threading.Thread):
    def __init__(self, bootstrap: str, topic: str, n: int, rows: int, rate: float, seed: int,
                 poison: float = 0.0) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        self.bootstrap, self.topic, self.n, self.rows, self.rate, self.seed = bootstrap, topic, n, rows, rate, seed
        self.poison_share = poison
        self.ids: list[str] = []
        self.poison: dict[str, str] = {}  # batch id -> kind
        self.ends: dict[int, int] = {}  # partition -> offset after the last message sent to it
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaProducer

        from consumers.wire import encode_batch

        import torch

        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
            rng, gen = random.Random(self.seed + 1), torch.Generator().manual_seed(self.seed + 1)
            started = time.monotonic()

            def send(value: bytes, headers: list) -> None:
                meta = producer.send(self.topic, value=value, headers=headers).get(timeout=30)
                self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)

            for i, (batch_id, name, x, y) in enumerate(_stream(self.n, self.rows, self.seed)):
                if i >= 8 and rng.random() < self.poison_share:  # after the first model exists
                    kind = rng.choice(POISON_KINDS)
                    poison_id = f"poison-{kind}-{i}"
                    send(*poison_message(kind, name, poison_id, self.rows, gen))
                    self.poison[poison_id] = kind
                value, headers = encode_batch(x, y, name, "tabular", batch_id)
                send(value, headers)
                self.ids.append(batch_id)
                time.sleep(max(0.0, (i + 1) / self.rate - (time.monotonic() - started)))
            producer.close(timeout=10)
        except BaseException as exc:  # reported by the driver
            self.error = exc


# --- the daemon under test -----------------------------------------------------------------------------
class Daemon:
    def __init__(self, kafka: str, redis_url: str, name: str, trace: Path, log_path: Path, pause: float) -> None:
        self.trace, self.log_path = trace, log_path
        self.args = [sys.executable, "-m", "daemon.cli", "run", "--kafka-bootstrap", kafka, "--redis-url", redis_url,
                     "--topic", f"{name}.in", "--dead-letter-topic", f"{name}.dlq", "--group-id", name,
                     "--redis-prefix", name, "--kafka-session-timeout-ms", "6000", "--model-family", "tabular_mlp",
                     "--device", "cpu", "--bootstrap-batches", "4", "--bootstrap-epochs", "3",
                     "--bootstrap-accuracy", "0.5", "--accuracy-threshold", "0.9", "--child-epochs", "3",
                     "--train-batch-size", "16", "--merge-after-child-updates", "6",
                     "--merge-interval-seconds", "5", "--merge-tolerance", "0.05", "--checkpoint-every-batches", "5",
                     # merges every few seconds (crash points to hit, a final version inside the settle window):
                     # at the default 0.10 a 1.5 s merge rests 13.5 s, past make scale's settle of 10-15 s
                     "--merge-cpu-share", "0.5",
                     "--checkpoint-every-seconds", "2", "--keep-versions", "100000", "--signing-key", SIGNING_KEY,
                     "--health-port", "0", "--publish-drain-seconds", "5", "--backoff-max-seconds", "2",
                     "--health-stall-seconds", "60",
                     # this harness's SIGKILLs land inside a batch on purpose: two in a row on one batch
                     # happen, and must not read as a batch that kills the process
                     "--crash-loop-after", "3"]
        self.env = {**os.environ, "FILIAL_CHAOS_TRACE": str(trace), "FILIAL_CHAOS_PAUSE": str(pause),
                    "FILIAL_LIMITS__MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None
        self.life = 0

    def start(self) -> int:
        """Start a new life; returns the trace position it starts from."""
        self.life += 1
        with open(self.trace, "a") as fh:
            fh.write(f"{time.monotonic():.6f} life {self.life}\n")
        logfile = open(self.log_path, "a")
        logfile.write(f"\n===== life {self.life} =====\n")
        logfile.flush()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=logfile, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        logfile.close()
        return self.trace.stat().st_size

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _trace_lines(trace: Path, since: int) -> list[str]:
    with open(trace) as fh:
        fh.seek(since)
        return fh.read().splitlines()


def _interrupted(lines: list[str]) -> str:
    """The phase the process was inside when it died: the innermost begin/at without its end."""
    open_phases: list[str] = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        _, kind, phase = parts
        if kind == "begin":
            open_phases.append(phase)
        elif kind == "at":
            open_phases = [p for p in open_phases if p != phase] + [f"{phase} ({RISKY_POINT[phase]})"]
        elif kind == "end":
            open_phases = [p for p in open_phases if not p.startswith(phase)]
    return open_phases[-1] if open_phases else "between phases"


def _wait_for_marker(trace: Path, since: int, target: str, timeout: float, alive) -> bool:
    """Poll the trace (1 ms) for ``at <target>`` (or ``begin train``) after ``since``."""
    want = "begin train" if target == "train" else f"at {target}"
    deadline = time.monotonic() + timeout
    with open(trace) as fh:
        fh.seek(since)
        buffer = ""
        while time.monotonic() < deadline and alive():
            chunk = fh.read()
            if chunk:
                buffer += chunk
                lines = buffer.split("\n")
                buffer = lines[-1]
                if any(line.endswith(want) for line in lines[:-1]):
                    return True
            else:
                time.sleep(0.001)
    return False


def _wait_moved_on(marker, previous: str, timeout: float, alive) -> bool:
    """Poll the daemon's in-flight marker (20 ms) until the batch ``previous`` is no longer in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        now = marker.read()
        if now is None or now.source != previous:
            return True
        time.sleep(0.02)
    return False


def _wait_ready(daemon: Daemon, since_log: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.running():
        with open(daemon.log_path) as fh:
            fh.seek(since_log)
            if "consuming " in fh.read():
                return True
        time.sleep(0.1)
    return False


class HealthWatch(threading.Thread):
    """Polls the running life's ``/healthz`` every second; each run of 503s is one stall."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(name="chaos-health", daemon=True)
        self.daemon_ = daemon
        self.url: str | None = None
        self.stalls: list[dict] = []
        self._stalled = False
        self._stop = threading.Event()

    def watch(self, since_log: int) -> None:
        """A new life: find its health URL in its log (port 0: each life has its own)."""
        self.url, self._stalled = None, False
        with open(self.daemon_.log_path) as fh:
            fh.seek(since_log)
            for line in fh:
                if "health and metrics on " in line:
                    self.url = line.split("health and metrics on ", 1)[1].split()[0]

    def unwatch(self) -> None:
        self.url = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        import urllib.error
        import urllib.request

        while not self._stop.wait(1.0):
            url = self.url
            if url is None:
                continue
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5):
                    self._stalled = False
            except urllib.error.HTTPError as err:
                if err.code == 503 and not self._stalled and self.url == url:
                    self._stalled = True
                    self.stalls.append({"life": self.daemon_.life, "body": err.read().decode()[:500]})
                    log.warning("stall in life %d: %s", self.daemon_.life, self.stalls[-1]["body"])
            except OSError:
                pass  # the life is being killed or restarted


def _wait_applied(client, meta_key: str, ids: list[str], ends: dict[str, int], alive, timeout: float) -> bool:
    """Until a checkpoint holds every valid id and is past every message sent (poison included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        raw = client.get(meta_key)
        if raw:
            meta = json.loads(raw)
            offsets = meta.get("applied_offsets", {})
            if set(ids) <= set(applied_batch_ids(meta)) and all(offsets.get(k, 0) >= v for k, v in ends.items()):
                return True
        time.sleep(1.0)
    return False


def dead_letters(bootstrap: str, topic: str) -> list[dict[str, str]]:
    """Every record of the dead-letter topic, as its headers."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        records: list[dict[str, str]] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                records += [{k: v.decode(errors="replace") for k, v in r.headers} for r in batch]
        return records
    finally:
        consumer.close()


def poison_audit(letters: list[dict[str, str]], produced: list[str], poison: dict[str, str],
                 applied_ids: list[str]) -> dict:
    per_id = Counter(h.get("batch_id") for h in letters)
    per_source = Counter(h.get("filial-source") for h in letters)
    return {
        "poison_injected": len(poison),
        "poison_injected_by_kind": dict(Counter(poison.values())),
        "poison_dead_lettered": sum(1 for i in poison if per_id[i]),
        "poison_not_dead_lettered": sorted(i for i in poison if not per_id[i]),
        "poison_applied": len(set(poison) & set(applied_ids)),
        "dead_lettered_twice": sum(n - 1 for n in per_source.values() if n > 1),
        "valid_dead_lettered": sorted(i for i in produced if per_id[i]),
        "dead_letter_reasons": dict(Counter(h.get("filial-reason") for h in letters)),
    }


# --- the audit ----------------------------------------------------------------------------------------
def applied_batch_ids(meta: dict) -> list[str]:
    """The batch ids a checkpoint's ledger (consumers.ledger) records, over all partitions."""
    return [i for entry in meta["ledger"].values() for i in entry["batch_ids"]]


def versions_audit(client, prefix: str, line: str = "main") -> dict:
    """Every version of ``line``: numbers 1..latest without gaps, one publish each, data present and
    verified (sha256 + HMAC); ``manifests`` are the verified ones, in order (tools/scale.py reads
    their publishers)."""
    from zoo_store.follow import Follower, VerificationError
    from zoo_store.keys import Keys
    from zoo_store.versions import VersionNotFound

    follower = Follower(client, line=line, prefix=prefix, signing_key=SIGNING_KEY.encode())
    versions = follower.store.versions(line)
    latest = follower.latest_version() or 0
    without_data, manifests = [], []
    for v in versions:
        try:
            manifest = follower.manifest(v)
            follower.verify(manifest, follower.store.weights(line, v))
            manifests.append(manifest)
        except (VersionNotFound, VerificationError) as exc:
            without_data.append({"version": v, "why": str(exc)})
    same_publish = Counter((m.reason, m.parent_version, m.weights_sha256) for m in manifests)
    return {"versions": versions, "latest_version": latest, "manifests": manifests,
            "version_gaps": len(set(range(1, latest + 1)) - set(versions)),
            "duplicate_versions": (sum(n - 1 for n in same_publish.values())
                                   + sum(n - 1 for n in Counter(m.publish_id for m in manifests).values())),
            "events_without_data": len(without_data), "problems": without_data,
            "publish_ids": client.hlen(Keys(prefix).line(line).publish_ids)}


def audit(redis_url: str, prefix: str, produced: list[str]) -> dict:
    from zoo_store.connection import connect
    from zoo_store.keys import Keys

    client = connect(redis_url)
    keys = Keys(prefix)
    meta = json.loads(client.get(keys.checkpoint_meta))
    ids = applied_batch_ids(meta)
    applied = set(ids) & set(produced)
    line = versions_audit(client, prefix)
    manifests = line["manifests"]
    parents = Counter(m.parent_version for m in manifests if m.parent_version is not None)
    return {
        "batches_produced": len(produced),
        "batches_applied": len(applied),
        "batches_lost": len(set(produced) - applied),
        "batches_applied_twice": meta["counters"]["batches"] - len(set(ids)),
        **{k: line[k] for k in ("versions", "version_gaps", "duplicate_versions", "events_without_data",
                                "latest_version", "publish_ids", "problems")},
        "served_version": meta["served_version"],
        # written, then a crash hit before the engine adopted and checkpointed it; the restarted daemon
        # published a different state from the same parent (the orphan stays valid, verifiable data)
        "orphaned_versions": [m.version for m in manifests
                              if m.version != meta["served_version"] and m.version not in parents],
        "duplicates_skipped": meta["counters"]["duplicates_skipped"],
        "merges_accepted": meta["counters"]["merges_accepted"],
        "children_spawned": meta["counters"]["children_spawned"],
    }


# --- the run ------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis
    from zoo_store.checkpoints import InFlightMarker
    from zoo_store.connection import connect
    from zoo_store.keys import Keys

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "chaos.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="filial-chaos-"))
    trace, daemon_log = work / "trace.txt", out / "chaos-daemon.log"
    trace.touch()
    daemon_log.write_text("")
    started = time.monotonic()
    name = f"chaos{int(time.time())}"
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        kafka.create_topics({f"{name}.in": 2, f"{name}.dlq": 1})
        daemon = Daemon(kafka.address, redis_server.address, name, trace, daemon_log, args.pause)
        producer = Producer(kafka.address, f"{name}.in", args.batches, args.rows, args.rate, args.seed, args.poison)
        producer.start()
        health = HealthWatch(daemon)
        health.start()
        kills, crash_loops = [], []
        marker = InFlightMarker(connect(redis_server.address), Keys(name))
        last_in_flight: str | None = None  # the batch in flight at the last kill

        def start_life() -> int:
            log_size = daemon_log.stat().st_size
            since = daemon.start()
            if not _wait_ready(daemon, log_size):
                raise RuntimeError(f"daemon did not start; see {daemon_log}")
            health.watch(log_size)
            return since

        def died_by_itself(where: str) -> None:
            code = daemon.proc.returncode
            crash_loops.append({"life": daemon.life, "code": code, "where": where})
            log.warning("life %d exited by itself (code %s) %s", daemon.life, code, where)
            if len(crash_loops) > 5:
                raise RuntimeError(f"daemon keeps exiting by itself; see {daemon_log}")

        targets = [PHASES[i % len(PHASES)] for i in range(args.kills)]
        rng.shuffle(targets)
        for i, target in enumerate(targets):
            if rng.random() < 0.15:
                target = "any"
            since = start_life()
            if last_in_flight is not None and not _wait_moved_on(marker, last_in_flight, 60.0, daemon.running):
                log.warning("life %d still on %s after 60 s", daemon.life, last_in_flight)
            time.sleep(rng.uniform(0.5, 3.0))  # somewhere into its life, not always at the first chance
            if target == "any":
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                found = _wait_for_marker(trace, since, target, timeout=25.0, alive=daemon.running)
                if not found:
                    target = f"{target} (not reached in 25s: any moment)"
            if not daemon.running():
                died_by_itself(f"before kill {i + 1}")
                continue
            health.unwatch()
            daemon.kill()
            in_flight = marker.read()
            last_in_flight = in_flight.source if in_flight is not None else None
            moment = _interrupted(_trace_lines(trace, since))
            kills.append({"kill": i + 1, "target": target, "interrupted": moment, "in_flight": last_in_flight,
                          "at_s": round(time.monotonic() - started, 1), "produced_so_far": len(producer.ids)})
            log.info("kill %d: target %s, interrupted %s (%d batches produced so far)", i + 1, target, moment,
                     len(producer.ids))
        producer.join()
        if producer.error:
            raise RuntimeError(f"producer failed: {producer.error}")
        # last life: run until every batch is in a durable checkpoint, then stop cleanly
        client = connect(redis_server.address)
        meta_key = Keys(name).checkpoint_meta
        ends = {f"{name}.in:{p}": end for p, end in producer.ends.items()}
        deadline = time.monotonic() + 300
        while True:
            start_life()
            if _wait_applied(client, meta_key, producer.ids, ends, daemon.running, deadline - time.monotonic()):
                break
            if daemon.running():
                break  # out of time: the audit says what is missing
            died_by_itself("in the last life")
        health.unwatch()
        health.stop()
        code = daemon.terminate()
        log.info("final life stopped with exit code %d", code)
        summary = audit(redis_server.address, name, producer.ids)
        meta = json.loads(client.get(meta_key))
        summary.update(poison_audit(dead_letters(kafka.address, f"{name}.dlq"), producer.ids, producer.poison,
                                    applied_batch_ids(meta)))
    moments = Counter(k["interrupted"].split(" ")[0] for k in kills)
    result = {"kills": len(kills), **{k: summary[k] for k in (
        "batches_produced", "batches_applied", "batches_lost", "batches_applied_twice", "versions", "version_gaps",
        "duplicate_versions", "events_without_data")},
              "interrupted": dict(moments), "served_version": summary["served_version"],
              "orphaned_versions": summary["orphaned_versions"], "duplicates_skipped": summary["duplicates_skipped"],
              "merges_accepted": summary["merges_accepted"], "seconds": round(time.monotonic() - started, 1),
              "poison_injected": summary["poison_injected"], "poison_dead_lettered": summary["poison_dead_lettered"],
              "stalls": len(health.stalls), "crash_loops": len(crash_loops),
              **{k: summary[k] for k in ("poison_injected_by_kind", "poison_not_dead_lettered", "poison_applied",
                                         "dead_lettered_twice", "valid_dead_lettered", "dead_letter_reasons")},
              "stall_log": health.stalls, "crash_loop_log": crash_loops,
              "kill_log": kills, "problems": summary["problems"]}
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    log.info("result: %s", json.dumps({k: v for k, v in result.items() if k != "kill_log"}))
    return result


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [chaos] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("kafka", "filial.embedded"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    result = main(args)
    order = ["kills", "batches_produced", "batches_applied", "batches_lost", "batches_applied_twice", "versions",
             "version_gaps", "duplicate_versions", "events_without_data", "poison_injected", "poison_dead_lettered",
             "stalls", "crash_loops"]
    last = {k: result[k] for k in order}
    print(json.dumps(last), flush=True)
    ok = all(result[k] == 0 for k in ("batches_lost", "batches_applied_twice", "version_gaps", "duplicate_versions",
                                      "events_without_data", "stalls", "crash_loops", "poison_applied",
                                      "dead_lettered_twice"))
    ok = ok and result["poison_dead_lettered"] == result["poison_injected"] and not result["valid_dead_lettered"]
    return 0 if ok and result["kills"] >= 10 else 1


if __name__ == "__main__":
    sys.exit(cli())
