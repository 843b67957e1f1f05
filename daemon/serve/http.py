"""``filial serve``'s HTTP API (Starlette on uvicorn):

- ``POST /predict``: a JSON or safetensors body (daemon/serve/bodies.py) → ``{"version", "mode",
  "labels", "probabilities", "members", "weights"}``: the served version the answer came from, the
  labels per row, the class probabilities per row (``probabilities=false`` leaves them out), and the
  zoo members used with each row's weights over them. Concurrent requests share model calls
  (daemon/serve/batching.py). 4xx with ``{"error": ...}`` saying what to send instead; 503 before a
  verified version is loaded.
- ``GET /healthz``: 200 while the process answers (the model runs off the event loop).
- ``GET /readyz``: 200 with the served version once a verified version is loaded; 503 with the
  reason before (put the server behind a load balancer on this one).
- ``GET /metrics``: Prometheus text (daemon/serve/metrics.py).

No state is kept between requests: any number of servers can follow the same Redis behind a
load balancer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
from typing import Any, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from daemon.serve.batching import BatcherClosed, MicroBatcher
from daemon.serve.bodies import BadRequest, parse_predict
from daemon.serve.metrics import ServeMetrics
from daemon.serve.predictor import InputError, NotReady, Prediction, check_rows, resolve_data_type
from daemon.serve.settings import MODES, ServeSettings

log = logging.getLogger("filial.serve")


def split_prediction(p: Prediction, sizes: Sequence[int]) -> list[Prediction]:
    """One batched prediction back into one per request (rows in order); the members are shared."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(dataclasses.replace(p, labels=p.labels[rows], probabilities=p.probabilities[rows],
                                       weights=p.weights[rows]))
        start += n
    return out


def prediction_json(p: Prediction, probabilities: bool) -> dict[str, Any]:
    body = {"version": p.version, "mode": p.mode, "labels": p.labels.tolist()}
    if probabilities:
        body["probabilities"] = p.probabilities.tolist()
    body.update(members=list(p.members), weights=p.weights.tolist())
    return body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ServeApp:
    """The routes over one predictor and the loader that feeds it."""

    def __init__(self, predictor: Any, loader: Any, settings: ServeSettings,
                 metrics: ServeMetrics | None = None) -> None:
        self.predictor, self.loader, self.settings = predictor, loader, settings
        self.metrics = metrics or ServeMetrics(loader)
        self.batcher = MicroBatcher(predictor.predict, split_prediction, settings.max_batch_rows,
                                    settings.max_wait_ms, on_batch=self.metrics.on_batch)
        self.app = Starlette(routes=[Route("/predict", self.predict, methods=["POST"]),
                                     Route("/healthz", self.healthz), Route("/readyz", self.readyz),
                                     Route("/metrics", self.render_metrics)],
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        await self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed max_body_bytes."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"the body is {declared} bytes, over the limit of {limit} (max_body_bytes): "
                                  "send fewer rows per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the body is over the limit of {limit} bytes (max_body_bytes): "
                                      "send fewer rows per request")
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            served = self.predictor.snapshot().served  # NotReady before the first verified version
            parsed = parse_predict(await self._body(request), request.headers.get("content-type"),
                                   request.query_params, served.data_type)
            mode = parsed.mode or self.settings.mode
            if mode not in MODES:
                raise BadRequest(400, f"mode {mode!r} is not one of {', '.join(MODES)}")
            if len(parsed.x) > self.settings.max_request_rows:
                raise BadRequest(413, f"{len(parsed.x)} rows, over the limit of {self.settings.max_request_rows} "
                                      "per request (max_request_rows): split them")
            check_rows(parsed.x, resolve_data_type(parsed.x, served, None), served)  # before sharing a call
            prediction = await self.batcher.predict(parsed.x, mode)
        except BadRequest as exc:
            self.metrics.failed.labels("too_large" if exc.status == 413 else "bad_request").inc()
            return _error(exc.status, str(exc))
        except InputError as exc:
            self.metrics.failed.labels("bad_request").inc()
            return _error(422, f"{exc}; send rows the served model takes")
        except NotReady:
            self.metrics.failed.labels("not_ready").inc()
            return _error(503, f"not ready: {self.not_ready_reason()}; retry, or watch GET /readyz")
        except BatcherClosed as exc:
            self.metrics.failed.labels("stopping").inc()
            return _error(503, f"{exc}; retry on another server")
        except ClientDisconnect:
            self.metrics.failed.labels("bad_request").inc()
            return _error(400, "the client went away before the body was read")
        except Exception:  # noqa: BLE001 - answered and logged; the server goes on
            log.exception("predict failed")
            self.metrics.failed.labels("error").inc()
            return _error(500, "the prediction failed on the server (logged); retry, or report it")
        body = prediction_json(prediction, parsed.probabilities)
        self.metrics.request_seconds.labels(prediction.mode).observe(time.perf_counter() - started)
        return JSONResponse(body)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        stats = self.loader.stats()
        body = {"ready": stats.ready, "version": stats.version, "zoo_size": stats.zoo_size}
        if not stats.ready:
            return JSONResponse({**body, "reason": self.not_ready_reason(stats)}, status_code=503)
        return JSONResponse(body)

    def not_ready_reason(self, stats: Any = None) -> str:
        stats = stats or self.loader.stats()
        what = f"no verified version of line {self.settings.line!r} is loaded"
        if stats.refusals:
            return f"{what}: {stats.refusals} refused (verification failed or they do not build; the log says why)"
        if self.settings.pin_version is not None:
            return f"{what}: waiting for the pinned v{self.settings.pin_version}"
        return f"{what} yet (none published, or Redis unreachable)"

    async def render_metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` (port 0: a free one, known before :meth:`start` returns).
    :meth:`run` blocks in the main thread (uvicorn stops on SIGTERM/SIGINT, finishing the requests in
    flight); :meth:`start` / :meth:`stop` run it in a thread (tests, benchmarks)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0,
                 graceful_seconds: float = 10.0) -> None:
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                    socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=graceful_seconds, backlog=2048)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @staticmethod
    def free_port(host: str = "127.0.0.1") -> int:
        """A port free now (for a server in another process; in this one, pass port 0)."""
        with socket.socket() as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> "HttpServer":
        self._thread = threading.Thread(target=self.run, name="filial-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.socket.close()
