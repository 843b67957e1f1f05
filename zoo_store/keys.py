"""The Redis key layout: the contract with followers in any language (README, "Redis: versions,
events and the key layout").

``{p}`` is the configured prefix (default ``filial``); ``{line}`` a model line (``main`` for the
served model, ``{line}.{child_id}`` such as ``main.c1`` for each compact child).

=================================  ======  =================================================
key                                type    content
=================================  ======  =================================================
{p}:lines                          SET     every model line that has published
{p}:line:{line}:latest             STRING  newest published version (integer)
{p}:line:{line}:v:{n}:weights      STRING  safetensors bytes of version n
{p}:line:{line}:v:{n}:manifest     STRING  JSON manifest of version n (zoo_store.models.Manifest)
{p}:line:{line}:v:{n}:fingerprint  STRING  safetensors of version n's per-slice fingerprints (optional;
                                           manifest ``fingerprint_slices``/``_sha256``/``_bytes``)
{p}:line:{line}:publish_ids        HASH    publish id -> version (a retried publish is a no-op)
{p}:line:{line}:events             STREAM  one entry per version, id ``{n}-0``, field ``event``
                                           (JSON VersionEvent); also PUBLISHed on a channel of
                                           the same name after the entry is written
{p}:zoo                            HASH    zoo member line -> its latest version (members: the
                                           children, each on its line ``{line}.{child_id}``)
{p}:zoo:events                     STREAM  capped; field ``event`` (JSON ZooEvent: member.published,
                                           member.removed); also PUBLISHed on a channel of that name
{p}:leader                         STRING  JSON {holder, token} of the merge leader's lease (expires)
{p}:leader:token                   STRING  the fencing token counter (only grows; zoo_store/lease.py)
{p}:contributions                  HASH    learner -> JSON meta of its contribution to the merge leader
{p}:contribution:{learner}         STRING  safetensors: its served model as learned, its slices' rows
                                           (zoo_store/contributions.py)
{p}:metrics                        STREAM  capped; field ``metric`` (JSON)
{p}:decisions                      STREAM  capped; field ``decision`` (JSON, one per batch)
{p}:merges                         STREAM  capped; field ``merge`` (JSON, accepted and rejected)
{p}:tree                           STRING  JSON snapshot of the model tree
{p}:checkpoint:meta                STRING  JSON engine checkpoint (offsets, counters, tree); with several
                                           learners each has its own: {p}:learner:{id}:checkpoint:...
{p}:checkpoint:tensors             STRING  safetensors bytes of the checkpoint's tensors
{p}:applied                        HASH    topic:partition -> next offset to apply, as its owner's last
                                           checkpoint holds it (shared: the next owner resumes there)
{p}:checkpoint:inflight            STRING  JSON: the batch being applied now and at how many
                                           consecutive crashes it was in flight (crash loops)
{p}:checkpoint:dead_letters        HASH    source (topic:partition:offset) -> reason: dead letters
                                           the broker acknowledged that no checkpoint covers yet
{p}:checkpoint:dead_letters:sending HASH   source -> when its send began (ms since the epoch): a
                                           dead letter in flight, whose fate a restart reads back
                                           from the dead-letter topic
=================================  ======  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "filial"
    learner: str = ""   # a learner's own keys (its checkpoint) when several share the prefix

    @property
    def _own(self) -> str:
        return f"{self.prefix}:learner:{self.learner}" if self.learner else self.prefix

    @property
    def lines(self) -> str:
        return f"{self.prefix}:lines"

    def line(self, line: str) -> "LineKeys":
        return LineKeys(f"{self.prefix}:line:{line}")

    @property
    def zoo(self) -> str:
        return f"{self.prefix}:zoo"

    @property
    def zoo_events(self) -> str:
        return f"{self.prefix}:zoo:events"

    @property
    def leader(self) -> str:
        return f"{self.prefix}:leader"

    @property
    def leader_token(self) -> str:
        return f"{self.prefix}:leader:token"

    @property
    def contributions(self) -> str:
        return f"{self.prefix}:contributions"

    def contribution(self, learner: str) -> str:
        return f"{self.prefix}:contribution:{learner}"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}:decisions"

    @property
    def merges(self) -> str:
        return f"{self.prefix}:merges"

    @property
    def tree(self) -> str:
        return f"{self.prefix}:tree"

    @property
    def applied_offsets(self) -> str:
        return f"{self.prefix}:applied"   # shared by the learners of a group, unlike their checkpoints

    @property
    def checkpoint_meta(self) -> str:
        return f"{self._own}:checkpoint:meta"

    @property
    def checkpoint_tensors(self) -> str:
        return f"{self._own}:checkpoint:tensors"

    @property
    def checkpoint_dead_letters(self) -> str:
        return f"{self._own}:checkpoint:dead_letters"

    @property
    def checkpoint_dead_letters_sending(self) -> str:
        return f"{self._own}:checkpoint:dead_letters:sending"

    @property
    def checkpoint_inflight(self) -> str:
        return f"{self._own}:checkpoint:inflight"


@dataclass(frozen=True)
class LineKeys:
    base: str

    @property
    def latest(self) -> str:
        return f"{self.base}:latest"

    @property
    def publish_ids(self) -> str:
        return f"{self.base}:publish_ids"

    @property
    def events(self) -> str:
        return f"{self.base}:events"

    def weights(self, version: int) -> str:
        return f"{self.base}:v:{version}:weights"

    def manifest(self, version: int) -> str:
        return f"{self.base}:v:{version}:manifest"

    def fingerprint(self, version: int) -> str:
        return f"{self.base}:v:{version}:fingerprint"


def event_id(version: int) -> str:
    """Stream entry id of a version's event: followers resume "after version n" from ``{n}-0``."""
    return f"{version}-0"
