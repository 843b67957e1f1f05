"""``filial bench throughput``'s publish -> follower latency, for models of about 1M and 10M parameters.

The default CNN (``image_cnn`` on 28x28) widened until it has about the parameters asked for (width
49: 987,164; width 156: 9,986,506). Each version goes through the daemon's publish path: the weights
serialised as the daemon does (:func:`daemon.service.publisher.serialize`, before the clock starts,
as a release is before its job is submitted), a :class:`daemon.service.publisher.PublishJob` submitted
to the daemon's :class:`~daemon.service.publisher.Publisher` thread, which writes it with
``VersionStore.publish`` (one transaction, then the event). A follower thread does what
``filial watch --load`` does (:class:`zoo_store.follow.Follower`): reads the event, fetches manifest
and weights, checks the sha256, decodes the safetensors, builds the architecture the manifest names
and loads the state into it. Latency: from the submit call to the state loaded, per publish, with the
next publish only after the follower has it (spaced, nothing else running); p50/p99 over the
publishes (with 30, p99 is the slowest). ``phases_p50_ms`` says where the time goes (:data:`PHASES`).
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from typing import Any

import torch

from benchmarks import progress
from benchmarks.serve_load import quantile

_log = progress("throughput")
# where the time goes (p50 of each): until the publisher's future resolved (the transaction, from the same
# clock); until the follower read the event; fetch + sha256 + decode; building the model and loading the state
PHASES = ("written", "event_read", "fetch_verify_decode", "build_load")


def cnn_for(parameters: int):
    """The image_cnn Architecture whose parameter count is nearest ``parameters``, and that count."""
    from daemon.learn.models import infer_architecture

    def count(width: int) -> int:  # ImageCNN on 1x28x28, 10 classes (daemon/learn/models.py)
        return 10 * width + (18 * width ** 2 + 2 * width) + (392 * width ** 2 + 4 * width) + (40 * width + 10)

    width = min(range(1, 2048), key=lambda w: abs(count(w) - parameters))
    return infer_architecture("image", torch.zeros(1, 28, 28, dtype=torch.uint8), 10, width), count(width)


def follower_latency(redis_url: str, parameters: int, publishes: int, prefix: str) -> dict[str, Any]:
    from daemon.learn.models import Architecture, parameter_count
    from daemon.service.publisher import PublishJob, Publisher, serialize
    from zoo_store.connection import connect
    from zoo_store.follow import Follower
    from zoo_store.keys import Keys
    from zoo_store.versions import VersionStore

    arch, expected = cnn_for(parameters)
    blobs = []
    for seed in range(2):  # two weight sets in turn: every publish is a new version with other bytes
        torch.manual_seed(seed)
        blobs.append(serialize(arch.build().state_dict()))
    publisher = Publisher(VersionStore(connect(redis_url), Keys(prefix))).start()
    follower = Follower(connect(redis_url), line="main", prefix=prefix)
    loaded: queue.Queue[tuple[int, list[float], int]] = queue.Queue()
    stop = threading.Event()

    def follow() -> None:
        for event in follower.events(from_version=1, block_ms=200, stop=stop):
            marks = [time.perf_counter()]                    # the event read
            manifest, state = follower.load(event.version)
            marks.append(time.perf_counter())                # fetched, sha256 checked, decoded
            model = Architecture.model_validate(manifest.architecture).build_with(state, adopt=True)
            marks.append(time.perf_counter())                # built (without initial weights) and loaded
            loaded.put((event.version, marks, parameter_count(model)))

    thread = threading.Thread(target=follow, name="follower", daemon=True)
    gc.collect()
    gc.freeze()  # as `filial watch` and `filial serve` do once set up (why: cmd_run in daemon/cli/__init__.py)
    thread.start()
    total, phases = [], {k: [] for k in PHASES}
    try:
        for i in range(publishes + 1):   # the first is a warm-up (connections, allocator), not counted
            weights, digest = blobs[i % 2]
            job = PublishJob("main", "merge", weights, f"bench-{i}-{digest[:24]}",
                             {"architecture": arch.model_dump(), "metrics": {"all": 0.9}, "slices": ["all"]},
                             weights_sha256=digest)
            started = time.perf_counter()
            published = publisher.submit(job).result(timeout=60)
            write = time.perf_counter() - started
            version, marks, count = loaded.get(timeout=60)
            if version != published.manifest.version or count != expected:
                raise RuntimeError(f"the follower loaded v{version} ({count} parameters), "
                                   f"v{published.manifest.version} ({expected}) was published")
            if i:
                total.append(1000 * (marks[-1] - started))
                for key, ms in zip(PHASES, (write, marks[0] - started, *(b - a for a, b in zip(marks, marks[1:])))):
                    phases[key].append(1000 * ms)
            time.sleep(0.05)
    finally:
        stop.set()
        publisher.stop(drain_seconds=5)
        thread.join(timeout=10)
    _log(f"publish -> follower, {expected:,} parameters: p50 {quantile(total, 0.5):.1f} ms, "
         f"p99 {quantile(total, 0.99):.1f} ms")
    return {"parameters": expected, "weights_bytes": len(blobs[0][0]), "publishes": len(total),
            "p50_ms": round(quantile(total, 0.5), 1), "p99_ms": round(quantile(total, 0.99), 1),
            "max_ms": round(max(total), 1),
            "phases_p50_ms": {k: round(quantile(v, 0.5), 1) for k, v in phases.items()}}
