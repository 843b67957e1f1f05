"""``filial serve``: its flags (generated from :class:`~daemon.serve.settings.ServeSettings`), its
wording, and the process: Redis client → :class:`~daemon.serve.loader.ZooLoader` (a background
thread following the served line and the zoo) → :class:`~daemon.serve.predictor.Predictor` →
the HTTP app on uvicorn, in the main thread until SIGTERM/SIGINT.

The CLI (daemon/cli.py) registers it and hands in what belongs to the composition root: the
logging setup and its user-error type (this layer does not import the service or the CLI).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import textwrap
from typing import Callable

from daemon.serve.settings import (ENV_PREFIX, SettingsError, add_settings_flags, settings_from_flags,
                                   unknown_variables)

log = logging.getLogger("filial.serve")

DESCRIPTION = (
    "Serve the models the daemon publishes over HTTP: POST /predict (JSON {\"x\": [[...]]} or a "
    "safetensors body holding x, as on the wire), GET /healthz, /readyz (200 once a verified version is "
    "loaded), /metrics. Follows the served line and the zoo of its children in Redis and swaps every new "
    "version in without failing a request (each request finishes on the models it started with); "
    "versions that fail verification are refused and the previous ones keep serving. Stateless: run as "
    "many as needed behind a load balancer. Every flag is also " + ENV_PREFIX + "<FIELD> in the "
    "environment or a .env file.")
EPILOG = (
    "examples:\n"
    "  filial serve --redis-url redis://localhost:6379/0 --port 8080\n"
    "  filial serve --redis-url redis://redis:6379/0 --mode blend --pin-version 12\n"
    "  curl -s localhost:8080/predict -H 'content-type: application/json' -d '{\"x\": [[...28 rows of 28...]]}'\n"
    "  curl -s 'localhost:8080/predict?mode=route' -H 'content-type: application/octet-stream' --data-binary @x.safetensors")


def add_serve_parser(sub, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser("serve", help="HTTP inference server over the published models (hot-swapped)",
                            description=textwrap.fill(DESCRIPTION, 100), epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser)
    parser.set_defaults(func=func)
    return parser


def serve(args: argparse.Namespace, setup_logging: Callable[[str, str], None],
          user_error: type[Exception]) -> int:
    """Run the server until SIGTERM/SIGINT; bad settings raise ``user_error`` naming the fields."""
    try:
        settings = settings_from_flags(args)
    except SettingsError as exc:
        raise user_error(f"{exc}\n(fix the flag or {ENV_PREFIX}* variable named above; see "
                         "'filial serve --help')") from None
    setup_logging(settings.log_level, settings.log_format)
    log.info("settings (secrets masked): %s", json.dumps(settings.public_dict()))
    for warning in unknown_variables(os.environ):
        log.warning("%s", warning)

    from daemon.learn.training import set_precision
    from daemon.serve.http import HttpServer, ServeApp
    from daemon.serve.loader import ZooLoader
    from daemon.serve.metrics import ServeMetrics
    from daemon.serve.predictor import Predictor
    from zoo_store.connection import connect

    client = connect(settings.redis_url, username=settings.redis_username, password=settings.secret("redis_password"),
                     ssl_ca_file=_path(settings.redis_ssl_cafile), ssl_cert_file=_path(settings.redis_ssl_certfile),
                     ssl_key_file=_path(settings.redis_ssl_keyfile))
    key = settings.secret("signing_key")
    set_precision(settings.precision)
    loader = ZooLoader(client, line=settings.line, prefix=settings.prefix, signing_key=key.encode() if key else None,
                       pin_version=settings.pin_version, device=settings.device)
    metrics = ServeMetrics(loader)

    def swapped(version: int, published_at: float | None) -> None:  # set after both: each needs the other
        metrics.observe_swap(version, published_at)
        log.info("serving %s v%d", settings.line, version)

    loader.on_swap = swapped
    try:
        server = HttpServer(ServeApp(Predictor(loader, mode=settings.mode, temperature=settings.temperature),
                                     loader, settings, metrics).app, settings.host, settings.port)
    except OSError as exc:
        raise user_error(f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); pick another "
                         "--port or --host") from None
    gc.collect()
    gc.freeze()  # start-up objects out of every full collection's walk (why: cmd_run in daemon/cli/__init__.py)
    loader.start()
    log.info("serving %s on %s (line %s, mode %s%s)", settings.redis_url, server.url, settings.line,
             settings.mode, f", pinned to v{settings.pin_version}" if settings.pin_version else "")
    # uvicorn takes SIGTERM/SIGINT while it runs, finishes the requests in flight, then raises the signal
    # again for the handler it found: a no-op one here, so the process ends with exit code 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        loader.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _path(value) -> str | None:
    return str(value) if value is not None else None
