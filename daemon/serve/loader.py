"""Follow the served line and the zoo in the background, and swap verified models in atomically.

    loader = ZooLoader(client, line="main", prefix="filial", signing_key=key).start()
    predictor = Predictor(loader, mode="blend")       # each predict takes loader.snapshot() once
    ...
    loader.stop()

Two threads, one per stream: the served line (:meth:`zoo_store.follow.Follower.events`) and the zoo
(:meth:`zoo_store.zoo.ZooFollower.events`), so a slow member load never delays a served version.
Each new version or member is loaded BESIDE the snapshot in use (fetched, verified as the follower
verifies: sha256 of weights and fingerprint, the HMAC with a signing key; then built and checked
against its architecture), and only then swapped in: a new :class:`ZooSnapshot` is built and the
reference replaced under one lock. Requests read the reference without the lock; one that took the
old snapshot finishes on it. A version that fails verification or does not build is REFUSED:
counted, logged, and the previous one keeps serving. ``pin_version`` serves exactly that served
version and ignores newer ones (the zoo is still followed). Redis outages: the followers' event
reads reconnect by themselves; every other read here is retried with capped backoff, and a thread
that fails anyway starts over from what it has loaded, so neither thread ever dies.

Only members of the followed line (``{line}.*``) that the served model's requests can run through
(same data type and number of classes) enter a snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import redis
import torch
from pydantic import ValidationError

from daemon.serve.members import Member, ZooSnapshot
from zoo_store.connection import CappedBackoff
from zoo_store.follow import Follower, VerificationError, VersionNotFound
from zoo_store.zoo import ZooFollower

log = logging.getLogger("filial.serve")

T = TypeVar("T")
OnSwap = Callable[[int, "float | None"], None]
REFUSED = (VerificationError, ValueError, KeyError, TypeError, ValidationError)   # a version we will not serve
OUTAGE = (redis.ConnectionError, redis.TimeoutError)


@dataclass(frozen=True)
class LoaderStats:
    ready: bool                 # a verified served version is loaded
    version: int | None         # the served version in the snapshot
    zoo_size: int               # models in the snapshot, the served one included
    swaps: int                  # snapshots replaced (served versions and member changes)
    refusals: int               # versions refused (verification failed, or they do not build)
    skipped: int                # served versions ignored (pinned, expired)
    last_swap_at: float | None  # epoch seconds


class ZooLoader:
    def __init__(self, client: redis.Redis, line: str = "main", prefix: str = "filial",
                 signing_key: bytes | None = None, require_signature: bool | None = None,
                 pin_version: int | None = None, follow_zoo: bool = True, device: str | torch.device = "cpu",
                 on_swap: OnSwap | None = None, block_ms: int = 250) -> None:
        self.line, self.pin_version, self.follow_zoo = line, pin_version, follow_zoo
        self.device, self.on_swap, self.block_ms = device, on_swap, block_ms
        self.follower = Follower(client, line=line, prefix=prefix, signing_key=signing_key,
                                 require_signature=require_signature)
        self.zoo = ZooFollower(client, prefix=prefix, signing_key=signing_key, require_signature=require_signature)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._served: Member | None = None
        self._members: dict[str, Member] = {}
        self._snapshot: ZooSnapshot | None = None
        self._swaps = self._refusals = self._skipped = 0
        self._last_swap_at: float | None = None

    # -------------------------------------------------------------------- the HTTP layer's view
    def snapshot(self) -> ZooSnapshot | None:
        """The snapshot in use (None before the first verified served version); no lock: one read."""
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    def stats(self) -> LoaderStats:
        with self._lock:
            snap = self._snapshot
            return LoaderStats(snap is not None, snap.served.version if snap else None, len(snap.all) if snap else 0,
                               self._swaps, self._refusals, self._skipped, self._last_swap_at)

    def wait_for(self, predicate: Callable[[ZooSnapshot | None], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` holds (checked at every swap) or ``timeout`` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._snapshot), timeout)

    # -------------------------------------------------------------------- lifecycle
    def start(self) -> "ZooLoader":
        targets = [("served", self._follow_served)] + ([("zoo", self._follow_zoo)] if self.follow_zoo else [])
        for name, target in targets:
            t = threading.Thread(target=self._forever, args=(target,), name=f"filial-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def __enter__(self) -> "ZooLoader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _forever(self, body: Callable[[], None]) -> None:
        backoff = CappedBackoff(base=0.2, cap=10.0)
        while not self._stop.is_set():
            try:
                body()
                return
            except OUTAGE as exc:                  # an outage outside the followers' own retries
                log.warning("%s: redis unavailable (%s); starting over in %.1fs", body.__name__, exc, backoff.failed())
            except Exception:                      # never die: log, wait, start over from what is loaded
                log.exception("%s failed; starting over in %.1fs", body.__name__, backoff.failed())
            backoff.sleep(self._stop)

    def _retry(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried through Redis outages until it answers or the loader stops."""
        backoff = CappedBackoff(base=0.2, cap=10.0)
        while True:
            try:
                return fn()
            except OUTAGE as exc:
                if self._stop.is_set():
                    raise
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff.failed())
                backoff.sleep(self._stop)

    # -------------------------------------------------------------------- the served line
    def _follow_served(self) -> None:
        pin = self.pin_version
        current = self._served.version if self._served else None
        start = pin if pin is not None else (current + 1 if current else "latest")
        for event in self.follower.events(from_version=start, block_ms=self.block_ms, stop=self._stop):
            if pin is not None and event.version != pin:
                self._skip(f"{self.line} v{event.version} ignored: serving pinned v{pin}"
                           + ("" if self._served else f" (v{pin} is not stored: expired or never published)"))
                continue
            if self._served and event.version <= self._served.version:
                continue
            member = self._load(self.line, event.version, self.follower.load_version)
            if member is None:
                continue
            self._swap(lambda: setattr(self, "_served", member))
            if self.on_swap is not None:
                try:
                    self.on_swap(member.version, member.published_at)
                except Exception:
                    log.exception("on_swap callback failed")
            if pin is not None:
                return                              # the pinned version is served: nothing more to follow

    # -------------------------------------------------------------------- the zoo
    def _follow_zoo(self) -> None:
        since = self._retry(self.zoo.last_event_id)      # before the index: nothing between is missed
        index = {m: v for m, v in self._retry(self.zoo.members).items() if self._ours(m)}
        for gone in set(self._members) - set(index):     # removed while we were away
            self._swap(lambda: self._members.pop(gone, None))
        for member_line, version in sorted(index.items()):
            self._member_published(member_line, version)
        for event in self.zoo.events(from_id=since, block_ms=self.block_ms, stop=self._stop):
            if not self._ours(event.line):
                continue
            if event.type == "member.published" and event.version is not None:
                self._member_published(event.line, event.version)
            elif event.type == "member.removed" and event.line in self._members:
                self._swap(lambda: self._members.pop(event.line, None))
                log.info("zoo member %s removed (%s)", event.line, event.reason)

    def _ours(self, member_line: str) -> bool:
        return member_line.startswith(self.line + ".")

    def _member_published(self, member_line: str, version: int) -> None:
        held = self._members.get(member_line)
        if held is not None and held.version >= version:
            return
        member = self._load(member_line, version, lambda v: self.zoo.load(member_line, v))
        if member is not None:
            self._swap(lambda: self._members.__setitem__(member_line, member))

    # -------------------------------------------------------------------- loading and swapping
    def _load(self, line: str, version: int, load) -> Member | None:
        """Fetch, verify and build one version beside the snapshot in use; None when refused or gone."""
        try:
            return Member.from_loaded(self._retry(lambda: load(version)), device=self.device)
        except VersionNotFound as exc:
            self._skip(f"{line} v{version} skipped: {exc}")
        except REFUSED as exc:
            with self._lock:
                self._refusals += 1
            log.error("refused %s v%d, the previous one keeps serving: %s", line, version, exc,
                      exc_info=not isinstance(exc, VerificationError))       # a traceback where it may be a bug
        return None

    def _skip(self, why: str) -> None:
        with self._lock:
            self._skipped += 1
        log.info(why)

    def _swap(self, change: Callable[[], object]) -> None:
        """Apply ``change`` to the loaded models and replace the snapshot: one reference assignment."""
        with self._changed:
            change()
            served = self._served
            if served is not None:
                members = tuple(m for _, m in sorted(self._members.items()) if runs_with(m, served))
                self._snapshot = ZooSnapshot(served, members)
                self._swaps += 1
                self._last_swap_at = time.time()
            self._changed.notify_all()


def runs_with(member: Member, served: Member) -> bool:
    """The served model's requests can run through ``member``: same data type and classes."""
    classes = member.architecture.params.get("num_classes"), served.architecture.params.get("num_classes")
    return member.data_type == served.data_type and classes[0] == classes[1]
