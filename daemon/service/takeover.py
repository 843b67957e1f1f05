"""A slice that moved to this learner (a rebalance of the consumer group) starts from what its former
owner left in Redis, not afresh: the held-out and replay rows of its contribution
(``zoo_store.contributions``), then the children it kept for the slice (its zoo members, verified as a
follower verifies them), which join this learner's tree as active children.

Called between two batches, before the first batch of a slice this engine holds nothing of. Redis
errors are logged and the slice starts with what was taken so far: the next batches still apply.
"""

from __future__ import annotations

import logging

import redis

from daemon.engine.engine import Engine
from daemon.service.publisher import member_line
from zoo_store.contributions import ContributionStore
from zoo_store.follow import VerificationError
from zoo_store.versions import VersionNotFound
from zoo_store.zoo import ZooFollower

log = logging.getLogger("filial.service")


def take_over_slice(engine: Engine, contributions: ContributionStore, zoo: ZooFollower | None, line: str,
                    learner: str, slice_name: str) -> list[str]:
    """Seed ``slice_name`` from the newest other learner's contribution that holds rows of it, then take
    over that learner's children spawned for it. Returns the children's node ids here."""
    try:
        others = contributions.read_all(exclude=learner)
    except redis.RedisError as exc:
        log.warning("cannot read contributions for slice %s (%s): it starts afresh", slice_name, exc)
        return []
    for c in sorted(others, key=lambda c: -c.version):
        if slice_name in c.replay or slice_name in c.heldout:
            if not engine.take_over_slice(slice_name, c.heldout.get(slice_name), c.replay.get(slice_name)):
                return []
            log.info("slice %s taken over from learner %s: its rows seed the buffers", slice_name, c.learner)
            return take_over_children(engine, zoo, line, c.learner, slice_name) if zoo is not None else []
    return []


def take_over_children(engine: Engine, zoo: ZooFollower, line: str, owner: str, slice_name: str) -> list[str]:
    """``owner``'s zoo members spawned for ``slice_name`` (the first of their slices: each is taken over
    once, with the slice it was made for) into ``engine``'s tree. Members that do not verify, or that
    the engine refuses (``Engine.take_over_child``), are skipped with the reason logged."""
    prefix = member_line(line, "", owner)
    taken = []
    try:
        members = zoo.members()
    except redis.RedisError as exc:
        log.warning("cannot list the zoo for slice %s's children (%s): the slice starts without them", slice_name, exc)
        return []
    for member, version in sorted(members.items()):
        if not member.startswith(prefix):
            continue
        try:
            loaded = zoo.load(member, version)
        except (VersionNotFound, VerificationError, redis.RedisError) as exc:
            log.warning("not taking over zoo member %s v%d: %s", member, version, exc)
            continue
        manifest = loaded.manifest
        if not manifest.slices or manifest.slices[0] != slice_name:
            continue
        node = engine.take_over_child(origin=f"{member} v{version}", architecture=manifest.architecture,
                                      state=loaded.state, slices=list(manifest.slices),
                                      spawn_method=manifest.spawn_method or "copy", base_version=manifest.base_version)
        if node is not None:
            taken.append(node)
    return taken
