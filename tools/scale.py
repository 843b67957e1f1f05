"""``make scale``: several learners on real servers, SIGKILLs, then an audit (issue 13).

Embedded broker and Redis, a ``--partitions`` topic, a producer of drifting slices (digits; ``s0`` as
is, ``s1``.. a feature permutation each; the second half of the stream adds the second half of the
slices), each message keyed by its slice and sent to partition ``i * partitions // slices`` (standing
in for the key's hash, so slices spread over the learners). ``--learners`` ``filial run`` processes
(tools/chaos.py's :class:`Daemon`, ``FILIAL_LEARNER_ID=l<i>``, a 3 s lease, one torch thread) share
group, prefix and line. Per ``--cycles``: SIGKILL a learner that does not lead at ``begin train``,
restart it; SIGKILL the lease holder at ``at merge`` (planned and gated, not published), restart it.
A thread samples the lease (``{p}:leader``) every 20 ms. After every batch is in some learner's
durable checkpoint, the learners run until no version was published for ``--settle`` s. Audit:

- **exactly once**: the final checkpoints' ledgers, concatenated, hold every produced id once
  (``batches_lost``: in none; ``batches_applied_twice``: ids in two ledgers plus, per learner, its
  batch counter over its distinct ids). Durable state only: a contribution a killed learner wrote
  before its checkpoint is not audited;
- **versions** (``chaos.versions_audit``): 1..latest without gaps, one publish each, data verified;
- **one leader per version**: each manifest's ``publisher`` held the lease at its ``created_at`` and
  the fencing token each manifest carries (``fencing_token``, checked by the publish transaction)
  never decreases from version to version;
- **accuracy not below one learner**: the latest served version against one ``filial run`` without
  ``learner_id`` or kills on the same stream (``--baseline``), row by row on the slices' test rows,
  with the publish gate's paired statistics (:func:`daemon.learn.merging.gate.paired_gate`): below
  when one learner is better overall by the stratified sign test at ``--alpha`` (one-sided), or when
  a slice drops beyond ``--tolerance`` by more than sampling noise explains (the gate's per-slice
  guard). One learner is not one figure: its merges run on a clock, so which merges the gate passes
  before the stream ends differs from run to run (six runs of the small stream below: 0.907 to
  0.937, two runs 0.029 apart, which the paired test calls significant). So ``--baseline-runs`` runs
  of it are made and the learners are compared with the median one: "below" means below a typical
  run of one learner, not below its luckiest.

Last stdout line: one JSON object (also ``<out-dir>/scale.json``). Run: ``python -m tools.scale``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from daemon.learn.merging.gate import DEFAULT_ALPHA, DEFAULT_TOLERANCE, paired_gate
from tools.chaos import Daemon, _interrupted, _trace_lines, _wait_for_marker, _wait_ready, applied_batch_ids, \
    versions_audit
from zoo_store.connection import connect
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore

log = logging.getLogger("filial.scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, default in (("--learners", 3), ("--partitions", 12), ("--slices", 6), ("--rows", 64), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--batches", type=int, default=360, help="batches to produce (default 360)")
    parser.add_argument("--rate", type=float, default=6.0, help="batches per second (default 6)")
    parser.add_argument("--cycles", type=int, default=1, help="kill cycles: a learner, then the leader")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds each risky point is held open")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="one learner too")
    parser.add_argument("--baseline-runs", type=int, default=3,
                        help="runs of one learner; the learners are compared with the median one (default 3)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds without a new version to stop (a "
                        "merge and the merge job's rest after it, as long again at the harness's merge_cpu_share "
                        "0.5, must fit in it)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance of 'one learner is better overall' (default {DEFAULT_ALPHA})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"a slice's drop against one learner allowed beyond noise (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--out-dir", default="bench-results")


# --- the stream ---------------------------------------------------------------------------------------
def stream(args: argparse.Namespace):
    """(slices: name -> (partition, test x, test y), batches: [(batch id, slice, x, y)])."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(bunch.target), generator=gen)
    x, y = (torch.from_numpy(bunch.data).float() / 16.0)[order], torch.from_numpy(bunch.target).long()[order]
    n_test = len(y) // 5
    perms = [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(args.slices - 1)]
    slices = {f"s{i}": (i * args.partitions // args.slices, x[:n_test][:, p].contiguous(), y[:n_test])
              for i, p in enumerate(perms)}
    train_x, train_y, batches, names = x[n_test:], y[n_test:], [], list(slices)
    for i in range(args.batches):
        active = names[:(len(names) + 1) // 2] if i < args.batches // 2 else names
        name = active[i % len(active)]
        lo = (i * args.rows) % (len(train_y) - args.rows)
        xs = train_x[lo:lo + args.rows][:, perms[names.index(name)]].contiguous()
        batches.append((f"scale-{i}", name, xs, train_y[lo:lo + args.rows].contiguous()))
    return slices, batches


class Producer(threading.Thread):
    def __init__(self, bootstrap: str, topic: str, slices: dict, batches: list, rate: float) -> None:
        super().__init__(name="scale-producer", daemon=True)
        self.bootstrap, self.topic, self.slices, self.batches, self.rate = bootstrap, topic, slices, batches, rate
        self.ids, self.ends, self.error = [], {}, None   # sent ids; partition -> offset after its last message

    def run(self) -> None:
        from kafka import KafkaProducer
        from consumers.wire import encode_batch
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
            started = time.monotonic()
            for i, (batch_id, name, x, y) in enumerate(self.batches):
                value, headers = encode_batch(x, y, name, "tabular", batch_id)
                meta = producer.send(self.topic, key=name.encode(), value=value, headers=headers,
                                     partition=self.slices[name][0]).get(timeout=30)
                self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)
                self.ids.append(batch_id)
                time.sleep(max(0.0, (i + 1) / self.rate - (time.monotonic() - started)))
            producer.close(timeout=10)
        except BaseException as exc:  # reported by the driver
            self.error = exc


class LeaseWatch(threading.Thread):
    """Samples ``{p}:leader`` every 20 ms: [(unix time, learner id or None, token or None)] on change."""
    def __init__(self, client, keys) -> None:
        super().__init__(name="scale-lease", daemon=True)
        self.client, self.keys, self.samples, self._halt = client, keys, [], threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            raw = self.client.get(self.keys.leader)
            held = json.loads(raw) if raw else None
            now = (held["holder"].split("@")[0], int(held["token"])) if held else (None, None)
            if not self.samples or self.samples[-1][1:] != now:
                self.samples.append((time.time(), *now))

    def stop(self) -> None:
        self._halt.set(), self.join()

    def holder_at(self, t: float) -> tuple[str | None, int | None]:
        before = [s for s in self.samples if s[0] <= t]
        return before[-1][1:] if before else (None, None)


def leader_audit(manifests: list, lease: LeaseWatch) -> dict:
    mismatches, decreases, last_token, publishers = [], [], 0, Counter()
    for m in manifests:
        t = datetime.fromisoformat(m.created_at.replace("Z", "+00:00")).timestamp()
        holder, sampled = lease.holder_at(t)
        if holder != m.publisher:  # a change within one sample of the publish: the next sample decides
            holder, sampled = lease.holder_at(t + 0.05)
        token = m.fencing_token if m.fencing_token is not None else sampled
        publishers[m.publisher or "-"] += 1
        if holder != m.publisher:
            mismatches.append({"version": m.version, "publisher": m.publisher, "lease_holder": holder})
        if token is not None and token < last_token:
            decreases.append({"version": m.version, "token": token, "previous": last_token})
        last_token = max(last_token, token or 0)
    return {"leader_mismatches": mismatches, "token_decreases": decreases, "publishers": dict(publishers),
            "lease_tokens": sorted({s[2] for s in lease.samples if s[2] is not None})}


def served_correctness(client, prefix: str, slices: dict) -> dict:
    """The latest served version's per-row correctness on each slice's test rows: {slice: bool tensor}."""
    from safetensors.torch import load as st_load
    from daemon.learn.merging.gate import correctness
    from daemon.learn.models import Architecture

    store = VersionStore(client, Keys(prefix))
    latest = store.latest("main")
    model = Architecture(**store.manifest("main", latest).architecture).build()
    model.load_state_dict(st_load(store.weights("main", latest)))
    return correctness(model, {name: (x, y) for name, (_, x, y) in slices.items()}, "tabular")


def mean_accuracy(correct: dict) -> float:
    return sum(float(c.float().mean()) for c in correct.values()) / len(correct)


def against_one_learner(group: dict, single: dict, alpha: float, tolerance: float) -> dict:
    """Is the learners' served version below one learner's on the same test rows? The gate's paired
    statistics, both ways: one learner better overall (one-sided, exact where few rows differ), and
    the learners' per-slice drops beyond ``tolerance`` past sampling noise."""
    single_better = paired_gate(group, single, alpha=alpha, tolerance=tolerance)
    drops = paired_gate(single, group, alpha=alpha, tolerance=tolerance)
    significant = single_better.gain > 0 and single_better.p_value <= alpha
    return {"difference": round(drops.gain, 4), "rows": drops.rows, "rows_gained": drops.gained,
            "rows_lost": drops.lost, "p_one_learner_better": round(single_better.p_value, 4),
            "slices_below": [r.describe() for r in drops.regressions],
            "below": significant or bool(drops.regressions)}


# --- one run: N learners, kills, drain, audit ---------------------------------------------------------
def run_group(args, kafka, redis_url: str, learners: int, cycles: int, slices: dict, batches: list,
              work: Path, out: Path, tag: str) -> dict:
    name = f"{tag}{int(time.time())}"
    kafka.create_topics({f"{name}.in": args.partitions, f"{name}.dlq": 1})
    ids = [f"l{i}" for i in range(learners)] if learners > 1 else [""]
    daemons = {}
    for lid in ids:
        d = Daemon(kafka.address, redis_url, name, work / f"{tag}-{lid or 'single'}.trace",
                   out / f"scale-{tag}-{lid or 'single'}.log", args.pause)
        d.trace.touch(), d.log_path.write_text("")
        d.env.update({"FILIAL_LEARNER_ID": lid, "FILIAL_LEASE_TTL_SECONDS": "3", "OMP_NUM_THREADS": "1"})
        daemons[lid] = d
    client = connect(redis_url)
    lease = LeaseWatch(client, Keys(name))
    lease.start()

    def start(lid: str) -> int:
        size = daemons[lid].log_path.stat().st_size
        since = daemons[lid].start()
        if not _wait_ready(daemons[lid], size):
            raise RuntimeError(f"learner {lid!r} did not start; see {daemons[lid].log_path}")
        return since

    since = {lid: start(lid) for lid in ids}
    producer = Producer(kafka.address, f"{name}.in", slices, batches, args.rate)
    producer.start()
    kills, started = [], time.monotonic()

    def kill(lid: str, target: str) -> None:
        d = daemons[lid]
        now = d.trace.stat().st_size if d.trace.exists() else since[lid]   # a moment from now on, not earlier
        found = _wait_for_marker(d.trace, max(now, since[lid]), target, timeout=60.0, alive=d.running)
        d.kill()
        lines = _trace_lines(d.trace, since[lid])
        marks = [ln.split()[1] for ln in lines if ln.split()[2:] == [target] and ln.split()[1] in ("begin", "end")]
        kills.append({"learner": lid, "target": target if found else f"{target} (not reached in 60s)",
                      "interrupted": (moment := _interrupted(lines)), "target_open": marks[-1:] == ["begin"],
                      "at_s": round(time.monotonic() - started, 1),
                      "produced_so_far": len(producer.ids)})
        log.info("%s: SIGKILL %s (target %s): interrupted %s", tag, lid, target, moment)
        time.sleep(1.0)
        since[lid] = start(lid)

    for cycle in range(cycles if learners > 1 else 0):
        due = len(batches) * (cycle + 0.6) / (cycles + 0.5)
        while len(producer.ids) < due or lease.holder_at(time.time())[0] is None:
            time.sleep(0.2)
        kill(next(lid for lid in ids if lid != lease.holder_at(time.time())[0]), "train")
        while lease.holder_at(time.time())[0] is None:
            time.sleep(0.2)
        kill(lease.holder_at(time.time())[0], "merge")
    producer.join()
    if producer.error:
        raise RuntimeError(f"producer failed: {producer.error}")
    ends = {f"{name}.in:{p}": end for p, end in producer.ends.items()}

    def metas() -> dict[str, dict]:
        raws = {lid: client.get(Keys(name, learner=lid).checkpoint_meta) for lid in ids}
        return {lid: json.loads(raw) for lid, raw in raws.items() if raw}

    def drained() -> bool:
        ms = metas().values()
        applied = {i for m in ms for i in applied_batch_ids(m)}
        return set(producer.ids) <= applied and all(
            max((m.get("applied_offsets", {}).get(k, 0) for m in ms), default=0) >= v for k, v in ends.items())

    deadline = time.monotonic() + 300
    while not drained() and time.monotonic() < deadline and all(d.running() for d in daemons.values()):
        time.sleep(1.0)
    store, quiet = VersionStore(client, Keys(name)), (None, time.monotonic())   # then until merges settle: no new
    while time.monotonic() - quiet[1] < args.settle and time.monotonic() < deadline + 60:   # version for --settle s
        quiet = (store.latest("main"), time.monotonic()) if store.latest("main") != quiet[0] else quiet
        time.sleep(0.5)
    for d in daemons.values():
        d.terminate()
    lease.stop()
    final = metas()
    per_id = Counter(i for m in final.values() for i in applied_batch_ids(m))
    in_one = sum(m["counters"]["batches"] - len(set(applied_batch_ids(m))) for m in final.values())
    line = versions_audit(client, name)
    correct = served_correctness(client, name, slices)
    result = {"learners": learners, "batches_produced": len(producer.ids),
              "batches_applied": len(set(producer.ids) & set(per_id)),
              "batches_lost": len(set(producer.ids) - set(per_id)),
              "batches_applied_twice": sum(n - 1 for n in per_id.values()) + in_one,
              "applied_per_learner": {lid or "single": m["counters"]["batches"] for lid, m in final.items()},
              "applied_twice_detail": {  # ids in two learners' ledgers (where); a learner's count over its ids
                  "in_two_ledgers": {i: [lid for lid, m in final.items() if i in applied_batch_ids(m)]
                                     for i, n in sorted(per_id.items()) if n > 1},
                  "counted_over_ids": {lid: m["counters"]["batches"] - len(set(applied_batch_ids(m)))
                                       for lid, m in final.items()}},
              **{k: line[k] for k in ("versions", "version_gaps", "duplicate_versions", "events_without_data",
                                      "problems")},
              **leader_audit(line["manifests"], lease),
              "correct": correct, "accuracy": round(mean_accuracy(correct), 4), "kills": kills,
              "seconds": round(time.monotonic() - started, 1)}
    result["versions"] = len(result["versions"])
    return result


def main(args: argparse.Namespace) -> dict:
    from daemon.service.embedded import EmbeddedKafka, EmbeddedRedis

    out, work, (slices, batches) = Path(args.out_dir), Path(tempfile.mkdtemp(prefix="filial-scale-")), stream(args)
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        group = run_group(args, kafka, redis_server.address, args.learners, args.cycles, slices, batches, work, out,
                          "scale")
        bases = [run_group(args, kafka, redis_server.address, 1, 0, slices, batches, work, out, f"single{r}")
                 for r in range(args.baseline_runs if args.baseline else 0)]
    base = sorted(bases, key=lambda b: b["accuracy"])[(len(bases) - 1) // 2] if bases else None   # the median run
    correct, base_correct = group.pop("correct"), base and base["correct"]
    result = {**group, "baseline_accuracy": base and base["accuracy"], "baseline_versions": base and base["versions"],
              "baseline_accuracies": [b["accuracy"] for b in bases]}
    checks = {k: result[k] in (0, [], {}) for k in ("batches_lost", "batches_applied_twice", "version_gaps",
                                                    "duplicate_versions", "events_without_data",
                                                    "leader_mismatches", "token_decreases")}
    checks["kills"] = len(result["kills"]) == 2 * args.cycles and all(  # the leader's kills land mid-merge
        "not reached" not in k["target"] and (k["target_open"] or k["target"] != "merge") for k in result["kills"])
    checks["one_publisher_at_a_time"] = result["versions"] > 0 and len(result["lease_tokens"]) > 1
    if base:
        result["against_one_learner"] = against_one_learner(correct, base_correct, args.alpha, args.tolerance)
        checks["accuracy"] = not result["against_one_learner"]["below"]
    result["checks"], result["ok"] = checks, all(checks.values())
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    return result


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [scale] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger("filial.embedded").setLevel(logging.ERROR)
    result = main(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("kills", "problems")}), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli())
