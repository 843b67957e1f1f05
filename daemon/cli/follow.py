"""``filial watch``, ``status`` and ``rollback``: the commands that follow or operate the published
lines in Redis (no broker, no daemon needed)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from daemon.cli.errors import UserError


# --- watch -----------------------------------------------------------------------------------------------
def cmd_watch(args: argparse.Namespace) -> int:
    import gc
    import threading

    from daemon.learn.models import Architecture, parameter_count
    from zoo_store.connection import connect
    from zoo_store.follow import Follower, VerificationError, VersionNotFound

    key = args.signing_key.encode() if args.signing_key else None
    follower = Follower(connect(args.redis_url), line=args.line, prefix=args.prefix, signing_key=key,
                        require_signature=args.require_signature or None)
    start: Any = args.from_version
    if start not in ("latest", "next"):
        try:
            start = int(start)
        except ValueError:
            raise UserError("--from-version takes a version number, 'latest' or 'next'") from None
    stop = threading.Event()
    timer = threading.Timer(args.timeout or 0, stop.set)
    if args.timeout:
        timer.start()
    seen = 0
    gc.collect()
    gc.freeze()  # start-up objects out of every full collection's walk (why: cmd_run in daemon/cli/__init__.py)
    try:
        for event in follower.events(from_version=start, stop=stop):
            record = event.model_dump()
            if args.load:
                try:
                    manifest, state = follower.load(event.version)
                except (VerificationError, VersionNotFound) as exc:  # said in the version's line; counts for --count
                    record.update(loaded=False, refused=str(exc) if isinstance(exc, VerificationError) else
                                  f"version {event.version} is gone (retention keeps the newest publish_keep_versions)")
                else:
                    model = Architecture.model_validate(manifest.architecture).build_with(state, adopt=True)
                    record.update(loaded=True, parameters=parameter_count(model))
            print(json.dumps(record), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    finally:
        stop.set()
        timer.cancel()  # a watch that ends early does not wait out --timeout
    return 0


# --- status ---------------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from zoo_store.connection import connect
    from zoo_store.keys import Keys
    from zoo_store.telemetry import Telemetry
    from zoo_store.versions import VersionStore

    client, keys = connect(args.redis_url), Keys(args.prefix)
    store, telemetry = VersionStore(client, keys), Telemetry(client, keys)
    fields = ("created_at", "reason", "base_version", "metrics", "continual")
    lines = {line: [{"version": v, **{k: getattr(m, k) for k in fields}}
                    for v in store.versions(line) for m in [store.manifest(line, v)]] for line in store.lines()}
    status = {"tree": telemetry.tree(), "lines": lines, "recent_decisions": telemetry.recent_decisions(args.recent),
              "recent_merges": telemetry.recent_merges(args.recent)}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    tree = status["tree"] or {"nodes": []}
    print("model tree:")
    for node in tree["nodes"]:
        indent = "  " if node["parent"] is None else "    └─ "
        print(f"{indent}{node['node_id']} [{node['status']}] slices={node['slices'] or [node['slice']]} "
              f"updates={node['updates']} samples={node['samples']}")
    for line, versions in lines.items():
        print(f"line {line}:")
        for v in versions:
            cl = v["continual"] or {}
            print(f"  v{v['version']} {v['created_at']} {v['reason']:<9} base=v{v['base_version']} avg="
                  f"{cl.get('average_accuracy')} forgetting={cl.get('average_forgetting')} bwt={cl.get('bwt')} "
                  f"{v['metrics']}")
    print("recent decisions:")
    for d in status["recent_decisions"]:
        print(f"  {d['at']} {d['slice']:<10} {d['action']:<8} kl={d['kl']} acc={d['accuracy']} {d['reason']}")
    print("recent merges:")
    for m in status["recent_merges"]:
        print(f"  {m['at']} {merge_verdict(m)} children={m['children']} {m['reason']}")
    return 0


def merge_verdict(merge: dict[str, Any]) -> str:
    """One merge record (``MergeOutcome.record``) in a word or three: accepted or confirmed on fresh rows
    (with the version it became), rejected, or rejected and held for confirmation."""
    if merge.get("accepted"):
        verdict = "confirmed" if merge.get("confirmed") else "accepted"
        return f"{verdict} -> v{merge['version']}" if merge.get("version") else verdict
    return "rejected, held for confirmation" if merge.get("held") else "rejected"


# --- rollback -------------------------------------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    from zoo_store.connection import connect
    from zoo_store.follow import Follower, VerificationError, VersionNotFound
    from zoo_store.keys import Keys
    from zoo_store.versions import VersionStore

    key = args.signing_key.encode() if args.signing_key else None
    client = connect(args.redis_url)
    store = VersionStore(client, Keys(args.prefix), signing_key=key)
    latest = store.latest(args.line)
    if latest is None:
        raise UserError(f"line {args.line!r} has no versions under prefix {args.prefix!r} (check --line, --prefix)")
    if not 1 <= args.to < latest:
        raise UserError(f"--to must name an earlier version of {args.line!r} (latest is v{latest})")
    try:
        Follower(client, line=args.line, prefix=args.prefix, signing_key=key).load_version(args.to)
    except VersionNotFound:
        kept = ", ".join(f"v{v}" for v in store.versions(args.line))
        raise UserError(f"v{args.to} is no longer stored (retention); stored: {kept}") from None
    except VerificationError as exc:
        raise UserError(f"v{args.to} does not verify, not republishing it: {exc}") from None
    published = store.rollback(args.line, args.to)
    manifest = published.manifest
    print(json.dumps({"line": args.line, "version": manifest.version, "rollback_of": manifest.rollback_of,
                      "parent_version": manifest.parent_version, "created": published.created}))
    return 0


def add_follow_commands(sub) -> None:
    watch = sub.add_parser("watch", help="follow model-update events (and load verified weights)",
                           description="Print one JSON line per published version. --load downloads the weights, "
                                       "checks sha256 (and the HMAC signature when --signing-key is given) and "
                                       "loads them into the architecture the manifest names.")
    watch.add_argument("--redis-url", required=True, help="e.g. redis://localhost:6379/0")
    watch.add_argument("--prefix", default="filial", help="key prefix the daemon publishes under")
    watch.add_argument("--line", default="main", help="model line (main, or a compact line)")
    watch.add_argument("--from-version", default="1", help="version number, 'latest' or 'next' [default: 1]")
    watch.add_argument("--load", action="store_true", help="download, verify and load each version")
    watch.add_argument("--signing-key", default=None, help="HMAC key the manifests are signed with")
    watch.add_argument("--require-signature", action="store_true", help="refuse unsigned manifests")
    watch.add_argument("--count", type=int, default=0, help="exit after this many versions")
    watch.add_argument("--timeout", type=float, default=0, help="exit after this many seconds")
    watch.set_defaults(func=cmd_watch)

    status = sub.add_parser("status", help="model tree, versions, recent decisions and merges",
                            description="Read the daemon's state from Redis: the model tree, published versions "
                                        "with their per-slice metrics, recent drift decisions and merges.")
    status.add_argument("--redis-url", required=True)
    status.add_argument("--prefix", default="filial")
    status.add_argument("--recent", type=int, default=10, help="how many recent decisions/merges to show")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    rollback = sub.add_parser("rollback", help="republish an earlier version as the newest one",
                              description="Republish version --to's weights as the line's next version: numbers "
                                          "stay monotonic, followers (and `filial serve`) move back without a gap, "
                                          "the manifest says reason=rollback and rollback_of. A running daemon "
                                          "serves it from its next merge on (it adopts a rollback of its version). "
                                          "The version is verified first (sha256, and the signature with "
                                          "--signing-key, which also signs the new manifest).",
                              epilog="example: filial rollback --redis-url redis://localhost:6379/0 --to 7")
    rollback.add_argument("--redis-url", required=True)
    rollback.add_argument("--prefix", default="filial")
    rollback.add_argument("--line", default="main")
    rollback.add_argument("--to", type=int, required=True, help="the version to serve again")
    rollback.add_argument("--signing-key", default=None, help="the daemon's HMAC key (verify and sign)")
    rollback.set_defaults(func=cmd_rollback)

