"""Serving: `filial serve`'s request latency and throughput under load, with and without a hot swap
every second, and publish → served latency.

Starts an embedded Redis, publishes a version of the default CNN (image_cnn on MNIST-shaped 1x28x28
inputs, as the daemon builds it) the way the daemon's publisher does (``VersionStore.publish``), and
runs the real ``filial serve`` in a process of its own.

(b) Load from another process (benchmarks/serve_load.py: asyncio httpx clients) with 1, 8 and 64
concurrent clients, each run once without swaps and once while a new version is published every
second; per run: p50/p99 latency, throughput, failed requests, the server's and the clients' CPU.
Every answer must name a version that was published.
(c) Publish → served: after each of ``--publishes`` publishes (spaced out, the server otherwise idle),
the time from the publish call returning until a ``POST /predict`` is answered by that version (polled
back to back, so the figure includes up to one request's latency).
(a) Accuracy by mode on mixed, unlabelled traffic of every slice seen, per ``filial bench cl`` stream
(:mod:`benchmarks.serve_accuracy`: the engine through the stream, then the zoo it would publish;
``--streams none`` skips it, ~3 min per image stream on 2 cores).

The last line of stdout is one JSON object: ``accuracy`` (``{stream: {mode: acc}}``),
``failed_requests`` (over every run), ``p99_ms``
(``{"clients_8": {"no_swap": ..., "swap_every_1s": ...}, ...}``), ``publish_to_served_ms`` (p50, p99).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as st_save

from benchmarks import progress, serve_accuracy
from benchmarks.serve_load import quantile, request_body
from daemon.learn.fingerprint import Fingerprint, encode_fingerprints
from daemon.learn.models import infer_architecture
from daemon.serve.http import HttpServer
from daemon.service.embedded import EmbeddedRedis
from zoo_store.connection import connect
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore
from zoo_store.zoo import ZooStore

ROOT = Path(__file__).resolve().parents[1]
_log = progress("serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve_accuracy.add_arguments(parser)  # (a): --streams (none: skip), --seeds, --batch-rows, ...
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients of each run (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each load run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved and pooled "
                        "(default: %(default)s)")
    parser.add_argument("--rows", type=int, default=1, help="images per request (default: %(default)s)")
    parser.add_argument("--body", choices=("safetensors", "json"), default="safetensors")
    parser.add_argument("--publishes", type=int, default=30, help="publishes timed for publish → served")
    parser.add_argument("--mode", default="served", help="the server's mode (default: %(default)s)")
    parser.add_argument("--members", type=int, default=0, help="zoo members published beside the served model "
                        "(for route, blend, layerwise; default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="the server's micro-batching wait")
    parser.add_argument("--max-batch-rows", type=int, default=None, help="the server's micro-batch size")


class Publisher:
    """Versions of the default CNN into Redis as the daemon's publisher writes them (weights, manifest and
    a fingerprint; a few distinct weight sets in turn, each publish a new version), and zoo members."""

    def __init__(self, client, prefix: str, line: str = "main") -> None:
        self.store = VersionStore(client, Keys(prefix), keep_versions=10)
        self.line = line
        self.arch = infer_architecture("image", torch.zeros(1, 28, 28, dtype=torch.uint8), 10, None)
        rows = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        self.blobs = []
        for seed in range(4):
            torch.manual_seed(seed)
            model = self.arch.build().eval()
            with torch.no_grad():
                fingerprint = encode_fingerprints({"all": Fingerprint.fit(model.features(rows))})
            self.blobs.append((st_save(model.state_dict()), st_save(fingerprint)))
        self.published: list[int] = []   # served versions
        self.count = 0
        self.lock = threading.Lock()

    def publish(self, line: str | None = None, kind: str = "served") -> int:
        with self.lock:
            n, self.count = self.count, self.count + 1
            weights, fingerprint = self.blobs[n % len(self.blobs)]
            manifest = self.store.publish(line or self.line, weights, publish_id=f"bench-{n}", reason="merge",
                                          architecture=self.arch.model_dump(), kind=kind, slices=["all"],
                                          metrics={"all": 0.9}, fingerprint=fingerprint,
                                          fingerprint_slices=["all"]).manifest
            if kind == "member":
                ZooStore(self.store).enter(manifest.line, manifest.version)
            else:
                self.published.append(manifest.version)
            return manifest.version


class Swapper(threading.Thread):
    """Publishes a new version every ``every`` seconds until stopped."""

    def __init__(self, publisher: Publisher, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.publisher, self.every, self.stop = publisher, every, threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.publisher.publish()
            self.count += 1


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process and its threads so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(redis_url: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = HttpServer.free_port()
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--redis-url", redis_url, "--host", "127.0.0.1",
           "--port", str(port), "--mode", args.mode, "--log-level", "WARNING"]
    for flag in ("max_wait_ms", "max_batch_rows"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILIAL_SERVE__")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    server = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"filial serve exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError("filial serve was not ready within 120 s")


def load_run(url: str, server: subprocess.Popen, clients: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--url", url, "--clients", str(clients),
           "--seconds", str(args.seconds), "--rows", str(args.rows), "--body", args.body]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cpu0, wall0 = _cpu_seconds(server.pid), time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.seconds + 300)
    cpu1, wall = _cpu_seconds(server.pid), time.monotonic() - wall0
    if done.returncode != 0:
        raise RuntimeError(f"the load process failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if cpu0 is not None and cpu1 is not None:
        result["server_cpu_percent"] = round(100 * (cpu1 - cpu0) / wall, 1)  # 100 = one core busy
    return result


def publish_to_served(url: str, publisher: Publisher, count: int) -> dict:
    body, ctype = request_body(1, "safetensors")
    times, missed = [], 0
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            version = publisher.publish()
            published = time.perf_counter()
            while True:
                reply = client.post(f"{url}/predict", content=body, headers={"content-type": ctype})
                if reply.status_code == 200 and reply.json()["version"] >= version:
                    times.append(time.perf_counter() - published)
                    break
                if time.perf_counter() - published > 10:
                    missed += 1
                    break
            time.sleep(0.2)
    ms = [t * 1000 for t in times]
    return {"p50": round(quantile(ms, 0.5), 1) if ms else None, "p99": round(quantile(ms, 0.99), 1) if ms else None,
            "max": round(max(ms), 1) if ms else None, "publishes": count, "not_served_within_10s": missed}


def pooled(results: list[dict]) -> dict:
    """The repeats of one configuration as one run: latencies pooled, counts summed."""
    ms = [t for r in results for t in r["latencies_ms"]]
    seconds = sum(r["seconds"] for r in results)
    cpu = [r["server_cpu_percent"] for r in results if r.get("server_cpu_percent") is not None]
    return {"repeats": len(results), "seconds": round(seconds, 1), "requests": len(ms),
            "failed": sum(r["failed"] for r in results), "errors": [e for r in results for e in r["errors"]][:5],
            "p50_ms": quantile(ms, 0.5), "p99_ms": quantile(ms, 0.99), "max_ms": max(ms) if ms else None,
            "requests_per_second": round(len(ms) / seconds, 1) if seconds else None,
            "server_cpu_percent": round(sum(cpu) / len(cpu), 1) if cpu else None,
            "client_cpu_seconds": round(sum(r["client_cpu_seconds"] for r in results), 2),
            "swaps": sum(r.get("swaps", 0) for r in results),
            "unpublished_versions_answered": sorted({v for r in results for v in r["unpublished_versions_answered"]})}


def main(args: argparse.Namespace) -> dict:
    accuracy = None
    if args.streams.strip() != "none":
        threads = torch.get_num_threads()
        accuracy = serve_accuracy.main(args)   # one torch thread, as filial bench cl's engines
        torch.set_num_threads(threads)
        _log(f"accuracy by mode: {json.dumps(accuracy['accuracy'])}")
    for noisy in ("httpx", "filial.zoo_store"):  # a line per request and per publish otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    results: dict[tuple[int, str], list[dict]] = {}
    with EmbeddedRedis() as redis_server:
        publisher = Publisher(connect(redis_server.address), prefix="filial")
        publisher.publish()
        for i in range(args.members):
            publisher.publish(f"main.c{i + 1}", kind="member")
        server, url = start_server(redis_server.address, args)
        try:
            _log(f"filial serve ready at {url}; warming up")
            load_run(url, server, 1, argparse.Namespace(**{**vars(args), "seconds": 2.0}))
            for repeat in range(args.repeats):  # the repeats interleave, so a slow spell of the machine hits both
                for n in clients:
                    for swap in (False, True):
                        swapper = Swapper(publisher) if swap else None
                        if swapper:
                            swapper.start()
                        result = load_run(url, server, n, args)
                        if swapper:
                            swapper.stop.set()
                            swapper.join()
                            result["swaps"] = swapper.count
                        result["unpublished_versions_answered"] = sorted(set(result["versions"]) - set(publisher.published))
                        results.setdefault((n, "swap_every_1s" if swap else "no_swap"), []).append(result)
                        _log(f"[{repeat + 1}/{args.repeats}] {n} clients, {'swap every 1s' if swap else 'no swap'}: "
                             f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, {result['requests_per_second']} "
                             f"req/s, failed {result['failed']}, server CPU {result.get('server_cpu_percent')}%")
            _log(f"publish → served over {args.publishes} publishes")
            latency = publish_to_served(url, publisher, args.publishes)
        finally:
            server.terminate()
            server.wait(timeout=60)
    runs: dict[str, dict[str, dict]] = {}
    for (n, kind), repeats in results.items():
        runs.setdefault(f"clients_{n}", {})[kind] = pooled(repeats)
    failed = sum(r["failed"] + len(r["unpublished_versions_answered"]) for c in runs.values() for r in c.values())

    def each(key: str) -> dict:
        return {c: {k: r[key] for k, r in v.items()} for c, v in runs.items()}

    p99 = each("p99_ms")
    ratio = {c: round(v["swap_every_1s"] / v["no_swap"], 2) for c, v in p99.items()
             if v.get("no_swap") and v.get("swap_every_1s")}
    return {"bench": "serve", "failed_requests": failed,
            "accuracy": accuracy["accuracy"] if accuracy else None,
            "accuracy_detail": {k: v for k, v in accuracy.items() if k not in ("accuracy", "bench")} if accuracy else None,
            "p99_ms": p99, "p50_ms": each("p50_ms"),
            "requests_per_second": each("requests_per_second"), "server_cpu_percent": each("server_cpu_percent"),
            "p99_swap_over_no_swap": ratio, "publish_to_served_ms": latency, "runs": runs,
            "cpu_cores": os.cpu_count(), "rows_per_request": args.rows, "body": args.body, "mode": args.mode,
            "members": args.members}
