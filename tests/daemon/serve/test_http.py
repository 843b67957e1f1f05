"""``filial serve`` over HTTP on a real valkey: readiness, hot swaps under concurrent load with no
failed request, refusal of a tampered version, 4xx for bad bodies, micro-batching, the command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from daemon.cli import main
from daemon.learn.fingerprint import Fingerprint, encode_fingerprints
from daemon.learn.models import infer_architecture
from daemon.serve.batching import MicroBatcher
from daemon.serve.http import HttpServer, ServeApp
from daemon.serve.loader import ZooLoader
from daemon.serve.predictor import Predictor
from daemon.serve.settings import MODES, load_settings
from tests.helpers import wait_until
from zoo_store.keys import Keys
from zoo_store.versions import VersionStore
from zoo_store.zoo import ZooStore

ROOT = Path(__file__).resolve().parents[3]
ARCH = infer_architecture("image", torch.zeros(1, 28, 28), 10, None)  # the default CNN on MNIST's shape
KEY = b"serve-test-key"
ROWS = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
BINARY = {"content-type": "application/octet-stream"}


def publish(client, prefix: str, seed: int, key: bytes | None = KEY, line: str = "main", kind: str = "served",
            announce: bool = True) -> int:
    """A version of the default CNN as the daemon writes it (weights, manifest, a fingerprint of slice
    ``a``); a member is also entered in the zoo unless ``announce`` is False."""
    torch.manual_seed(seed)
    model = ARCH.build().eval()
    with torch.no_grad():
        fingerprint = {"a": Fingerprint.fit(model.features(ROWS.float().unsqueeze(1) / 255))}
    store = VersionStore(client, Keys(prefix), signing_key=key, keep_versions=50)
    version = store.publish(line, st_save(model.state_dict()), publish_id=f"p{seed}-{time.monotonic_ns()}",
                            reason="merge", architecture=ARCH.model_dump(), kind=kind, slices=["a"],
                            metrics={"a": 0.5 + seed / 100}, fingerprint=st_save(encode_fingerprints(fingerprint)),
                            fingerprint_slices=["a"]).manifest.version
    if kind == "member" and announce:
        ZooStore(store).enter(line, version)
    return version


@contextlib.contextmanager
def serving(client, prefix: str, **overrides):
    settings = load_settings(redis_url="redis://unused", prefix=prefix, **overrides)
    loader = ZooLoader(client, line="main", prefix=prefix, signing_key=KEY, pin_version=settings.pin_version)
    app = ServeApp(Predictor(loader, mode=settings.mode), loader, settings)
    loader.start()
    server = HttpServer(app.app).start()
    try:
        yield server.url, app, loader
    finally:
        server.stop()
        loader.stop()


def predict(url: str, rows: torch.Tensor = ROWS, **query) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=st_save({"x": rows}), headers=BINARY, params=query, timeout=30)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_ready_only_once_a_verified_version_is_loaded_then_serves_it(redis_client, unique):
    with serving(redis_client, unique) as (url, _, _):
        assert httpx.get(f"{url}/healthz").status_code == 200
        before = httpx.get(f"{url}/readyz")
        assert before.status_code == 503 and before.json()["reason"]
        assert predict(url).status_code == 503 and "not ready" in predict(url).json()["error"]
        version = publish(redis_client, unique, seed=1)
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=30)
        reply = predict(url)
        assert reply.status_code == 200
        body = reply.json()
        assert body["version"] == version and body["mode"] == "served" and len(body["labels"]) == 3
        assert len(body["probabilities"]) == 3 and abs(sum(body["probabilities"][0]) - 1) < 1e-4
        assert body["members"] == [f"main:v{version}"] and body["weights"] == [[1.0]] * 3
        as_json = httpx.post(f"{url}/predict", json={"x": ROWS.tolist(), "probabilities": False}).json()
        assert as_json["labels"] == body["labels"] and "probabilities" not in as_json
        assert metric(url, "filial_serve_version") == version


def test_no_failed_request_while_versions_are_published_every_200ms(redis_client, unique):
    published = [publish(redis_client, unique, seed=0)]
    publish(redis_client, unique, seed=100, line="main.c1", kind="member")
    with serving(redis_client, unique) as (url, _, _):
        assert wait_until(lambda: httpx.get(f"{url}/readyz").json().get("zoo_size") == 2, timeout=30)
        stop, failures, seen, answered = threading.Event(), [], set(), []

        def client(mode: str) -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    try:
                        reply = http.post(f"{url}/predict", content=st_save({"x": ROWS[:2]}), headers=BINARY,
                                          params={"mode": mode})
                        assert reply.status_code == 200, reply.text
                        body = reply.json()
                        assert body["mode"] == mode and len(body["weights"]) == 2
                        seen.add(body["version"])
                        answered.append(1)
                    except Exception as exc:  # noqa: BLE001 - every failure is the test's failure
                        failures.append(repr(exc))

        threads = [threading.Thread(target=client, args=(mode,)) for mode in MODES * 2]
        for t in threads:
            t.start()
        for seed in range(1, 16):  # the served line every 0.2 s, the member every 0.4 s
            time.sleep(0.2)
            published.append(publish(redis_client, unique, seed=seed))
            if seed % 2:
                publish(redis_client, unique, seed=100 + seed, line="main.c1", kind="member")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert seen <= set(published), f"answers named unpublished versions {seen - set(published)}"
        assert len(seen) >= 5 and len(answered) > 100, (seen, len(answered))
        assert metric(url, "filial_serve_swaps_total") >= 10


def test_a_tampered_version_is_refused_and_the_previous_keeps_serving(redis_client, unique):
    good = publish(redis_client, unique, seed=1)
    with serving(redis_client, unique) as (url, _, _):
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=30)
        tampered = publish(redis_client, unique, seed=2, key=b"not the publisher's key")  # HMAC does not verify
        assert wait_until(lambda: metric(url, "filial_serve_refusals_total") >= 1, timeout=30)
        assert predict(url).json()["version"] == good and httpx.get(f"{url}/readyz").json()["version"] == good
        after = publish(redis_client, unique, seed=3)
        assert after == tampered + 1
        assert wait_until(lambda: predict(url).json()["version"] == after, timeout=30)


def test_a_tampered_member_is_refused_and_the_zoo_keeps_serving(redis_client, unique):
    publish(redis_client, unique, seed=1)
    publish(redis_client, unique, seed=2, line="main.c1", kind="member")
    with serving(redis_client, unique, mode="blend") as (url, _, _):
        assert wait_until(lambda: httpx.get(f"{url}/readyz").json().get("zoo_size") == 2, timeout=30)
        body = predict(url).json()
        assert body["members"] == ["main:v1", "main.c1:v1"] and body["mode"] == "blend"
        assert all(abs(sum(row) - 1) < 1e-4 for row in body["weights"])
        v2 = publish(redis_client, unique, seed=3, line="main.c1", kind="member", announce=False)
        key = Keys(unique).line("main.c1").weights(v2)
        weights = bytearray(redis_client.get(key))
        weights[-1] ^= 0xFF  # one bit pattern changed after publishing: the sha256 no longer matches
        redis_client.set(key, bytes(weights))
        ZooStore(VersionStore(redis_client, Keys(unique))).enter("main.c1", v2)
        assert wait_until(lambda: metric(url, "filial_serve_refusals_total") >= 1, timeout=30)
        assert predict(url, mode="route").json()["members"] == ["main:v1", "main.c1:v1"]


@pytest.mark.parametrize("body,headers,status,says", [
    (b"{not json", {"content-type": "application/json"}, 400, "not JSON"),
    (b'{"rows": [[1]]}', {"content-type": "application/json"}, 400, "'x'"),
    (b'{"x": [[1, 2], [3]]}', {"content-type": "application/json"}, 400, "rectangular"),
    (b'{"x": [1, 2, 3]}', {"content-type": "application/json"}, 400, "rows"),
    (b'{"x": [[0.5]], "colour": 1}', {"content-type": "application/json"}, 400, "unknown fields"),
    (b'{"x": [[[0.5, 0.5], [0.5, 0.5]]], "mode": "psychic"}', {"content-type": "application/json"}, 400, "served"),
    (b"not safetensors", BINARY, 400, "safetensors"),
    (st_save({"x": ROWS, "y": torch.zeros(3, dtype=torch.int64)}), BINARY, 400, "exactly one tensor"),
    (st_save({"x": torch.zeros(1, 3, 28, 28, dtype=torch.uint8)}), BINARY, 422, "channels"),
    (st_save({"x": ROWS[:1].to(torch.int64)}), BINARY, 422, "int64"),
    (st_save({"x": torch.full((1, 28, 28), float("nan"))}), BINARY, 422, "NaN"),
    (b"x,y\n1,2", {"content-type": "text/csv"}, 415, "application/json"),
    (b"0" * 9000, BINARY, 413, "max_body_bytes"),
], ids=["json", "no-x", "ragged", "not-rows", "unknown-field", "mode", "bytes", "extra-tensor", "channels",
        "dtype", "nan", "content-type", "too-large"])
def test_bad_bodies_get_a_4xx_saying_what_to_send(redis_client, unique, body, headers, status, says):
    publish(redis_client, unique, seed=1)
    with serving(redis_client, unique, max_body_bytes=8192) as (url, _, _):
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=30)
        reply = httpx.post(f"{url}/predict", content=body, headers=headers)
        assert reply.status_code == status, reply.text
        assert says in reply.json()["error"]
        assert predict(url, ROWS[:1]).status_code == 200  # the server goes on


def test_concurrent_requests_share_model_calls(redis_client, unique):
    publish(redis_client, unique, seed=1)
    with serving(redis_client, unique, max_wait_ms=50) as (url, _, _):
        assert wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=30)
        start, replies = threading.Barrier(12), []

        def client(i: int) -> None:
            start.wait()
            replies.append((i, predict(url, ROWS[i % 3:i % 3 + 1]).json()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alone = {i: predict(url, ROWS[i:i + 1]).json()["labels"] for i in range(3)}
        assert all(body["labels"] == alone[i % 3] for i, body in replies)  # each got its own rows back
        calls, requests = metric(url, "filial_serve_batch_requests_count"), metric(url, "filial_serve_batch_requests_sum")
        assert requests == 15 and calls < 12, (calls, requests)


def test_the_batcher_never_mixes_modes_or_dtypes_and_isolates_a_failing_request():
    calls = []

    def fake_predict(x: torch.Tensor, mode):
        calls.append((mode, x.dtype, len(x)))
        if bool((x == 13).any()):
            raise ValueError("13 is unlucky")
        return x.sum(dim=1)

    async def run():
        batcher = MicroBatcher(fake_predict, lambda out, sizes: list(out.split(list(sizes))), max_wait_ms=30)
        await batcher.start()
        jobs = [batcher.predict(torch.ones(2, 4), "blend"), batcher.predict(torch.ones(1, 4), "route"),
                batcher.predict(torch.ones(1, 4, dtype=torch.float64), "blend"), batcher.predict(torch.ones(3, 4), "blend"),
                batcher.predict(torch.full((1, 4), 13.0), "blend")]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(run())
    assert [r.tolist() for r in results[:4]] == [[4.0, 4.0], [4.0], [4.0], [4.0, 4.0, 4.0]]
    assert isinstance(results[4], ValueError)
    assert ("blend", torch.float32, 6) in calls  # three blend float32 requests in one call (then singly)
    assert ("route", torch.float32, 1) in calls and ("blend", torch.float64, 1) in calls


def test_filial_serve_help_and_a_bad_setting_naming_the_field(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--redis-url", "--pin-version", "--mode", "--max-wait-ms", "FILIAL_SERVE__"):
        assert flag in out
    assert main(["serve", "--redis-url", "http://redis:6379", "--mode", "psychic"]) == 2
    err = capsys.readouterr().err
    assert "--redis-url" in err and "FILIAL_SERVE__REDIS_URL" in err and "--mode" in err and "filial serve --help" in err


def test_filial_serve_pinned_serves_that_version_and_stops_on_sigterm(redis_client, redis_server, unique):
    pinned = publish(redis_client, unique, seed=1)
    publish(redis_client, unique, seed=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILIAL_")}
    env.update(PYTHONPATH=str(ROOT), FILIAL_SERVE__SIGNING_KEY=KEY.decode())
    port = HttpServer.free_port()
    server = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--redis-url", redis_server.address,
                               "--prefix", unique, "--host", "127.0.0.1", "--port", str(port),
                               "--pin-version", str(pinned)], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, timeout=90), "filial serve did not become ready"
        assert predict(url).json()["version"] == pinned
        assert metric(url, "filial_serve_publish_to_served_seconds_count") == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
        stderr = server.communicate()[1]
    assert "Traceback" not in stderr, stderr[-3000:]


def test_settings_come_from_the_environment_and_a_misspelt_variable_is_named(monkeypatch, tmp_path):
    from daemon.serve.settings import unknown_variables

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("FILIAL_SERVE__REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FILIAL_SERVE__MAX_WAIT_MS", "5")
    settings = load_settings(port=9000)  # a flag over the environment
    assert (settings.redis_url, settings.max_wait_ms, settings.port) == ("redis://redis:6379/0", 5.0, 9000)
    (warning,) = unknown_variables({"FILIAL_SERVE__MAX_WAIT": "5", "FILIAL_SERVE__PORT": "1", "FILIAL_TOPIC": "t"})
    assert "FILIAL_SERVE__MAX_WAIT " in warning and "did you mean FILIAL_SERVE__MAX_WAIT_MS" in warning
