"""The load of ``filial bench serve``, run in a process of its own so the clients never share a core's
GIL with the server: ``python -m benchmarks.serve_load --url URL --clients N --seconds S``.

``clients`` concurrent clients (asyncio tasks, each an httpx client on one keep-alive connection)
send ``POST /predict`` back to back for ``seconds``; each request holds ``rows`` random MNIST-shaped
uint8 images (1x28x28, the default CNN's input) as a safetensors or JSON body. Prints one JSON line:
requests answered, failed (anything but a 200 with a prediction, errors included), latency p50/p99
of the answered ones (and every latency, for pooling runs), throughput, the versions the answers
named, and this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import torch
from safetensors.torch import save as st_save


def request_body(rows: int, kind: str, seed: int = 0) -> tuple[bytes, str]:
    x = torch.randint(0, 256, (rows, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if kind == "json":
        return json.dumps({"x": x.tolist()}).encode(), "application/json"
    return st_save({"x": x}), "application/octet-stream"


def quantile(xs: list[float], q: float) -> float | None:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else None


async def _client(client: httpx.AsyncClient, url: str, body: bytes, ctype: str, deadline: float,
                  latencies: list[float], versions: set[int], errors: list[str]) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            reply = await client.post(url, content=body, headers={"content-type": ctype})
            if reply.status_code != 200:
                raise RuntimeError(f"{reply.status_code}: {reply.text[:200]}")
            version = reply.json()["version"]
        except Exception as exc:  # noqa: BLE001 - every failure is counted and a few are shown
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        latencies.append(time.perf_counter() - started)
        versions.add(version)


async def run(url: str, clients: int, seconds: float, rows: int, body_kind: str) -> dict:
    body, ctype = request_body(rows, body_kind)
    latencies: list[float] = []
    versions: set[int] = set()
    errors: list[str] = []
    # one httpx client (one keep-alive connection) per task: a shared pool of 64 connections costs httpx
    # ~5x the CPU per request. Each is built and connected (one request) before the clock starts: building
    # one takes ~30 ms (its TLS context), which would otherwise be the first 64 requests' latency.
    pool = [httpx.AsyncClient(timeout=httpx.Timeout(60.0)) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.post(f"{url}/predict", content=body, headers={"content-type": ctype}) for c in pool))
        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(_client(c, f"{url}/predict", body, ctype, started + seconds, latencies, versions, errors)
                               for c in pool))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return {"clients": clients, "rows_per_request": rows, "body": body_kind, "seconds": round(wall, 2),
            "requests": len(latencies), "failed": len(errors), "errors": errors[:5],
            "p50_ms": round(quantile(latencies, 0.50) * 1000, 2) if latencies else None,
            "p99_ms": round(quantile(latencies, 0.99) * 1000, 2) if latencies else None,
            "requests_per_second": round(len(latencies) / wall, 1), "rows_per_second": round(len(latencies) * rows / wall, 1),
            "versions": sorted(versions), "client_cpu_seconds": round(cpu, 2),
            "latencies_ms": [round(t * 1000, 2) for t in latencies]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--body", choices=("safetensors", "json"), default="safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(asyncio.run(run(args.url, args.clients, args.seconds, args.rows, args.body))), flush=True)


if __name__ == "__main__":
    main()
