"""The engine facade: the one lock around the learner's state, and what the service may ask of it.

- :meth:`Engine.process` applies one decoded batch (the learner, :mod:`daemon.engine.learner`);
- :meth:`Engine.merge_snapshot` copies out what a merge reads; :func:`daemon.engine.merger.merge`
  runs on it outside the lock, so ingest continues while a merge is computed;
- ``release_*`` hand the service what to publish, copied out under the lock and evaluated outside
  it; ``adopt_*`` install a published version. The service never takes the lock itself.
- :meth:`Engine.checkpoint` / :meth:`Engine.restore` use the codec of :mod:`daemon.engine.state`.

The engine knows no Kafka or Redis names: which records were applied is the consumer side's
ledger (``consumers.ledger``), saved in the same checkpoint by the service.
See docs/architecture.md for the threads and locks.

Over 400 lines because it is the whole surface the service may use (one learner's batches, merges,
releases and adoptions, and what several learners exchange: contributions, other learners' rows to
rehearse, a learner's consolidation when another leads, slices taken over, external versions), each
method a few lines under the lock; splitting it would spread the lock's discipline over several modules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from dataclasses import replace
from typing import Any, Sequence

import torch

from consumers.wire import Batch
from daemon.engine import atomic, merger, stages
from daemon.engine.learner import Learner
from daemon.engine.overlap import Overlap
from daemon.engine.records import (BatchResult, ChildRelease, Contribution, Counters, EngineStatus, MergeOutcome,
                                   Release)
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from daemon.engine.stages import StageClock
from daemon.engine.state import EngineState, cpu_state, decode, encode
from daemon.engine.tree import ROOT, ModelTree, Node
from daemon.learn.continual import continual_metrics
from daemon.learn.replay import SliceBuffers
from daemon.learn.drift import calibrate_threshold
from daemon.learn.fingerprint import fit_slices
from daemon.learn.models import Architecture
from daemon.learn.policy import Thresholds
from daemon.learn.training import embed, model_input, set_precision
from zoo_store.models import utc_now

log = logging.getLogger("filial.engine")


class Engine:
    def __init__(self, model: ModelSettings | None = None, learner: LearnerSettings | None = None,
                 merge: MergeSettings | None = None, device: torch.device | None = None) -> None:
        self.model_settings = model or ModelSettings()
        self.learner_settings = learner or LearnerSettings()
        self.merge_settings = merge or MergeSettings()
        self.device = device or torch.device("cpu")
        set_precision(self.model_settings.precision)
        self._learner = Learner(self.model_settings, self.learner_settings, self.merge_settings, self.device,
                                Overlap(self.device))
        self._lock = threading.RLock()
        s = self.learner_settings
        self._state = EngineState(tree=ModelTree(), buffers=SliceBuffers(s.replay_per_slice, s.heldout_per_slice),
                                  thresholds=Thresholds(kl=s.kl_threshold, accuracy=s.accuracy_threshold,
                                                        concept_alpha=s.concept_drift_alpha),
                                  generator=torch.Generator().manual_seed(s.seed))
        # the states this learner offered the merge leader on the served version, by sample count (the
        # leader's plan names the one it merged): in memory only; after a restart the fallback is the
        # served version (see adopt_external)
        self._contributed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    # --- queries (copies, taken under the lock) ------------------------------------------------------
    @property
    def served_version(self) -> int | None:
        with self._lock:
            return self._state.served_version

    @property
    def counters(self) -> Counters:
        with self._lock:
            return replace(self._state.counters)

    @property
    def architecture(self) -> Architecture | None:
        with self._lock:
            root = self._state.root
            return root.architecture if root is not None else None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with self._lock:
            root = self._state.root
            return {root.data_type: tuple(root.reference_x.shape[1:])} if root is not None else {}

    def prequential_accuracy(self) -> dict[str, float]:
        with self._lock:
            return {s: c / n for s, (c, n) in sorted(self._state.prequential.items()) if n}

    def status(self) -> EngineStatus:
        with self._lock:
            statuses = Tally(n.status for n in self._state.tree.nodes.values())
            return EngineStatus(replace(self._state.counters), self._state.served_version,
                                self.prequential_accuracy(), dict(statuses))

    def describe_tree(self) -> dict[str, Any]:
        with self._lock:
            return self._state.tree.describe()

    def served_state(self) -> dict[str, torch.Tensor]:
        """The weights of the version followers hold (before the first publish: the model being bootstrapped)."""
        with self._lock:
            st = self._state
            return dict(st.published_state) if st.published_state is not None else cpu_state(st.root.model)

    def working_state(self) -> dict[str, torch.Tensor]:
        """The served model as it has learned since its last publish."""
        with self._lock:
            return cpu_state(self._state.root.model)

    def metrics(self, state: dict[str, torch.Tensor] | None = None,
                extra: merger.Sets | None = None) -> dict[str, float]:
        """Held-out accuracy per slice of ``state`` (default: the served version), evaluated outside the
        lock; ``extra``: held-out rows of slices other learners contributed."""
        with self._lock:
            root = self._state.root
            arch, data_type = root.architecture, root.data_type
            sets = {**(extra or {}), **self._state.buffers.heldout_sets()}
        state = state if state is not None else self.served_state()
        return merger.heldout_accuracy(self._build(arch, state), data_type, sets)

    def _build(self, arch: Architecture, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        return arch.build_with(state, self.device)

    # --- per batch ------------------------------------------------------------------------------------
    def process(self, batch: Batch) -> BatchResult:
        """Apply one batch, all or nothing (:mod:`daemon.engine.atomic`): if the learner raises, the
        state is put back as it was before the batch and the exception propagates."""
        started = time.perf_counter()
        clock = StageClock()
        with self._lock:
            with clock(stages.SNAPSHOT):
                before = atomic.snapshot(self._state)
            try:
                result = self._learner.apply(self._state, batch, clock)
            except Exception:
                self._state = atomic.rolled_back(before, self._state, self.device)
                raise
        return replace(result, seconds=time.perf_counter() - started)

    def finish_bootstrap_idle(self, idle_seconds: float) -> bool:
        """Ingest paused while the first model was still waiting for batches: finish it now if it is
        good enough on the held-out rows so far (True: the service publishes it)."""
        with self._lock:
            return self._learner.finish_bootstrap_idle(self._state, idle_seconds)

    def count_duplicate(self) -> None:
        """A replayed batch the ledger recognised: counted, not applied."""
        with self._lock:
            self._state.counters.duplicates_skipped += 1

    # --- merging ----------------------------------------------------------------------------------------
    def merge_snapshot(self, contributions: Sequence[Contribution] = ()) -> merger.MergeSnapshot | None:
        """What a merge of the active children (and of other learners' ``contributions`` built on the
        served version) reads; None when nothing was learned since the last try."""
        with self._lock:
            st = self._state
            root = st.root
            if st.served_version is None or root is None:
                return None
            active = st.tree.active_children()
            learns = self.learner_settings.train_served
            usable = [c for c in contributions if c.version == st.served_version
                      and c.architecture == root.architecture.model_dump()]
            signature = tuple((c.node_id, c.updates) for c in active) + (
                (("served", st.counters.served_updates),) if learns else ()) + tuple(
                (f"learner:{c.learner}", c.samples) for c in usable)
            if (not (active or usable or (learns and st.counters.served_updates))
                    or signature == st.last_merge_signature):
                return None  # nothing learned since the last attempt: the same merge again
            st.last_merge_signature = signature
            st.counters.child_updates_since_merge = 0
            children = [c for c in active if c.in_weight_space_of(root)]
            heldout, replay = st.buffers.heldout_sets(), st.buffers.replay_sets()
            for c in usable:  # this learner's own rows win for a slice both have seen
                heldout = {**c.heldout, **heldout}
                replay = {**c.replay, **replay}
            return merger.MergeSnapshot(
                base=st.base_state, served=st.published_state,
                working=cpu_state(root.model) if learns else None, working_weight=float(max(root.samples, 1)),
                children=[cpu_state(c.model) for c in children] + [c.state for c in usable],
                weights=[float(max(c.samples, 1)) for c in children] + [float(max(c.samples, 1)) for c in usable],
                ids=[c.node_id for c in children] + [f"learner:{c.learner}" for c in usable],
                distill={c.node_id: merger.DistillChild(c.updates, c.architecture, cpu_state(c.model))
                         for c in active if not c.in_weight_space_of(root)},
                replay=replay, heldout=heldout,
                served_version=st.served_version, base_version=st.base_version,
                architecture=root.architecture, data_type=root.data_type, seed=st.counters.batches,
                slice_age={s: st.counters.batches - b for s, b in st.slice_last_batch.items()})

    def merge(self, contributions: Sequence[Contribution] = ()) -> MergeOutcome | None:
        """Merge the active children (and other learners' contributions) into a candidate and gate it;
        None when there is nothing new. Only the snapshot holds the lock."""
        confirmed = self._take_confirmed()
        if confirmed is not None:
            return confirmed
        snapshot = self.merge_snapshot(contributions)
        if snapshot is None:
            return None
        outcome = merger.merge(snapshot, self.merge_settings, self.learner_settings, self.device)
        with self._lock:
            local = set(self._state.buffers.heldout_sets())
        foreign = {name: rows for name, rows in snapshot.heldout.items() if name not in local}
        if foreign:
            outcome = replace(outcome, foreign_heldout=foreign)
        pending = merger.hold_for_confirmation(snapshot, outcome, self.merge_settings)
        if pending is not None:
            outcome = pending.outcome  # the same, marked held
        with self._lock:
            self._state.pending = pending
            if outcome.accepted:
                self._state.counters.merges_accepted += 1
            else:
                self._state.counters.merges_rejected += 1
                if outcome.working_takes_candidate:  # followers keep their version; the learner builds on it
                    root = self._state.root
                    root.model.load_state_dict(_carry_progress(outcome.state, outcome.working_state, root.model))
        return outcome

    def candidate_confirmed(self) -> bool:
        """A held candidate was confirmed on fresh rows: the next merge publishes it without computing
        anything (the merge job does not rest for it)."""
        with self._lock:
            pending = self._state.pending
            return pending is not None and pending.confirmation.confirmed is not None

    def _take_confirmed(self) -> MergeOutcome | None:
        """The held candidate once fresh rows confirmed it, as an accepted merge (then no longer held)."""
        with self._lock:
            st = self._state
            pending = st.pending
            if pending is None or pending.confirmation.confirmed is None:
                return None
            st.pending = None
            if pending.served_version != st.served_version:  # another version was adopted meanwhile
                return None
            st.counters.merges_accepted += 1
        return merger.confirmed_outcome(pending)

    def consolidate_working(self, contributions: Sequence[Contribution] = ()) -> bool:
        """A learner that does not lead (another merges the group's contributions): its served model as
        trained is consolidated on every slice's replay rows, its own and ``contributions``', and kept when
        it scores at least as well on the selection rows, as one learner's is at each merge (accepted or
        not). Without it, a learner whose contributions the leader's merges do not publish would never
        rehearse in full and would drift towards its own slices. Returns whether it took the result."""
        if not self.merge_settings.consolidate_epochs or not self.learner_settings.train_served:
            return False
        snapshot = self.merge_snapshot(contributions)
        if snapshot is None or snapshot.working is None or not snapshot.replay:
            return False
        state, takes, report = merger.consolidate_working(snapshot, self.merge_settings, self.learner_settings,
                                                          self.device)
        log.info("consolidated this learner's served model (another learner leads the merges): %s epochs on %s "
                 "slices, %s", report["epochs"], report["slices"],
                 "kept" if takes else "not kept (no better on the selection rows)")
        if takes:
            with self._lock:
                root = self._state.root
                root.model.load_state_dict(_carry_progress(state, snapshot.working, root.model))
        return takes

    # --- releases (what to publish) and adoption ----------------------------------------------------
    def _release(self, reason: str, state: dict[str, torch.Tensor], base_version: int | None,
                 merge: dict[str, Any] | None, foreign: merger.Sets | None = None) -> Release:
        with self._lock:
            st = self._state
            lineage = [n.describe_lineage() for n in st.tree.nodes.values()]
            arch, parent, batches = st.root.architecture, st.served_version, st.counters.batches
            learned, fresh = {s: acc for s, (acc, _) in st.learned.items()}, st.fresh_slices()
            data_type, rows = st.root.data_type, {name: x for name, (x, _) in st.buffers.replay_sets().items()}
        metrics = self.metrics(state, foreign)
        fingerprints = fit_slices(self._build(arch, state), data_type, rows)
        return Release(reason, state, arch, parent, base_version, lineage, metrics, merge,
                       continual_metrics(metrics, learned, fresh), batches, data_type, fingerprints)

    def record_served(self, release: Release) -> None:
        """``release`` was published and adopted: the slices it learned keep its accuracy on them,
        from which their later forgetting is measured (:mod:`daemon.learn.continual`)."""
        if release.continual is None:
            return
        with self._lock:
            for s in release.continual.learned:
                self._state.learned[s] = [release.metrics[s], release.batches]

    def release_bootstrap(self) -> Release:
        return self._release("bootstrap", self.working_state(), None, None)

    def release_merge(self, outcome: MergeOutcome) -> Release:
        return self._release("merge", outcome.state, outcome.base_version, outcome.plan, outcome.foreign_heldout)

    def knows_slice(self, name: str) -> bool:
        with self._lock:
            return name in self._state.known_slices()

    def take_over_slice(self, name: str, heldout: tuple[torch.Tensor, torch.Tensor] | None,
                        replay: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """A slice another learner owned until a rebalance: its held-out and replay rows (from that
        learner's contribution) seed this engine's buffers, so the slice's history still trains and
        judges merges here. Only for a slice this engine holds nothing of."""
        with self._lock:
            st = self._state
            if name in st.known_slices():
                return False
            empty = (torch.empty(0), torch.empty(0, dtype=torch.long))
            (xr, yr), (xh, yh) = replay or empty, heldout or empty
            st.buffers.add(name, xr, yr, xh, yh, st.generator)
            return True

    def take_over_child(self, *, origin: str, architecture: dict[str, Any], state: dict[str, torch.Tensor],
                        slices: list[str], spawn_method: str, base_version: int | None) -> str | None:
        """A child another learner kept for slices that moved here (its zoo member, ``origin``) joins
        this tree as an active child: it is routed to, retrained and merged as this engine's own, so a
        rebalance does not lose the slice's specialist. Its reference is the slices' replay rows (taken
        over with them). Refused (None, logged) when it cannot serve here: not the served model's
        architecture (at most another width: a compact child), a same-size copy on another base version than this engine's
        (its task vector would be taken against the wrong weights), or ``max_children`` reached.
        Returns its node id here."""
        arch = Architecture.model_validate(architecture)
        with self._lock:
            st = self._state
            root = st.root
            if root is None or st.served_version is None:
                return None
            same_size = arch == root.architecture
            why = None
            if same_size and spawn_method == "copy" and base_version != st.base_version:
                why = f"a copy of base v{base_version}, this learner's base is v{st.base_version}"
            elif not same_size and _but_width(arch) != _but_width(root.architecture):
                why = f"not the served model's architecture at another width ({arch.model_dump()})"
            elif len(st.tree.active_children()) >= self.learner_settings.max_children:
                why = f"max_children {self.learner_settings.max_children} active"
            replay = st.buffers.replay_sets()
            rows = [replay[s][0] for s in slices if s in replay]
            if why is None and not rows:
                why = "none of its slices' rows are held here"
            if why is not None:
                log.info("not taking over child %s: %s", origin, why)
                return None
            node_id = st.tree.new_child_id()
            child = Node(node_id=node_id, parent=ROOT, slice=slices[0], data_type=root.data_type, architecture=arch,
                         model=arch.build_with(state, self.device), created_at=utc_now(),
                         reference_x=rows[0][:0], fingerprint=None, status="active", base_version=base_version,
                         slices=list(slices), spawn_method=spawn_method)
            self._learner.grow_reference(st, child, torch.cat(rows))
            child.refresh_fingerprint()
            st.tree.add(child)
            log.info("took over child %s as %s (%s, slices %s)", origin, node_id, spawn_method, slices)
            return node_id

    def rehearse_others(self, replay: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Other learners' replay rows by slice (from their contributions), rehearsed with this
        learner's own, so its served model and children keep every slice of the group as a single
        learner keeps every slice it saw; replaces the previous ones. Slices this engine holds are
        its own to replay."""
        with self._lock:
            st = self._state
            mine = st.known_slices()
            st.buffers.others = {name: rows for name, rows in replay.items() if name not in mine}

    def contribution(self, learner: str) -> Contribution | None:
        """This learner's served model as it learned since the served version, with its slices' rows:
        what the merge leader merges from it (None before a first version, or when it does not learn)."""
        with self._lock:
            st = self._state
            root = st.root
            if root is None or st.served_version is None or not self.learner_settings.train_served:
                return None
            state = cpu_state(root.model)
            recent = [k for k in self._contributed if k[0] == st.served_version][-(_CONTRIBUTIONS_KEPT - 1):]
            self._contributed = {k: self._contributed[k] for k in recent}
            self._contributed[(st.served_version, root.samples)] = state
            return Contribution(learner, st.served_version, root.samples, root.architecture.model_dump(),
                                state, st.buffers.heldout_sets(), st.buffers.replay_sets())

    def children_to_publish(self) -> list[ChildRelease]:
        """Children trained since they were last published as zoo members, each with its held-out
        accuracy per slice and its fingerprint of the slices it trained on."""
        with self._lock:
            st = self._state
            root = st.root
            if root is None or st.served_version is None:
                return []
            due = [(c, cpu_state(c.model), list(c.slices or [c.slice])) for c in st.tree.active_children()
                   if c.updates > c.published_updates]
            version, root_lineage = st.served_version, root.describe_lineage()
            sets, replay = st.buffers.heldout_sets(), st.buffers.replay_sets()
        releases = []
        for child, state, slices in due:
            model = self._build(child.architecture, state)
            rows = {name: replay[name][0] for name in slices if name in replay}
            releases.append(ChildRelease(child.node_id, child.updates, child.architecture, state,
                                         merger.heldout_accuracy(model, child.data_type, sets), version,
                                         [root_lineage, child.describe_lineage()], slices, child.spawn_method,
                                         child.base_version, child.data_type,
                                         fit_slices(model, child.data_type, rows)))
        return releases

    def active_children(self) -> set[str]:
        with self._lock:
            return {c.node_id for c in self._state.tree.active_children()}

    def child_published(self, release: ChildRelease) -> None:
        with self._lock:
            node = self._state.tree.nodes.get(release.node_id)
            if node is not None:
                node.published_updates = max(node.published_updates, release.updates)

    def adopt_bootstrap(self, version: int) -> None:
        with self._lock:
            st = self._state
            st.served_version = version
            st.base_version = version
            st.base_state = cpu_state(st.root.model)
            st.published_state = st.base_state
            st.root.base_version = version
            st.root.refresh_fingerprint(st.published_model())
            self._calibrate()

    def _calibrate(self) -> None:
        rate = self.learner_settings.kl_false_alarm_rate
        if rate is None:
            return
        st = self._state
        root = st.root
        feats = embed(st.published_model(), model_input(root.reference_x, root.data_type))
        st.thresholds = replace(st.thresholds, kl=calibrate_threshold(feats, self.learner_settings.train_batch_size,
                                                                      rate))
        st.kl_calibrated_rate = rate
        log.info("calibrated kl_threshold %.4f at false-alarm rate %s", st.thresholds.kl, rate)

    def adopt_merge(self, outcome: MergeOutcome, version: int) -> None:
        """The merge was published as ``version``: serve it, and widen the served reference."""
        with self._lock:
            st = self._state
            root = st.root
            st.published_state = {k: v.clone() for k, v in outcome.state.items()}
            root.model.load_state_dict(_carry_progress(outcome.state, outcome.working_state, root.model))
            for cid, (updates, state) in outcome.distilled_children.items():
                child = st.tree.nodes.get(cid)
                if child is not None and child.updates == updates:  # not retrained meanwhile
                    child.model.load_state_dict(state)
                    child.refresh_fingerprint()
            for cid in outcome.children:
                child = st.tree.nodes.get(cid)
                if child is None:  # another learner's contribution: its slices live in its own tree
                    continue
                self._learner.grow_reference(st, root, child.reference_x)
                for s in child.slices:
                    if s not in root.slices:
                        root.slices.append(s)
            root.refresh_fingerprint(st.published_model())
            st.served_version = version
            root.updates += 1
            if len(st.tree.active_children()) >= self.learner_settings.max_children:
                self._rebase(version)

    def _rebase(self, version: int) -> None:
        """Too many children: the served model becomes the new base and the children retire."""
        st = self._state
        for child in st.tree.active_children():
            child.status = "retired"
        st.base_state = st.published_state
        st.base_version = version
        log.info("rebased on v%d: children retired, their knowledge lives in the served model", version)

    def adopt_recovered(self, *, version: int, parent_version: int | None, architecture: dict[str, Any],
                        state: dict[str, torch.Tensor], base_version: int | None,
                        metrics: dict[str, float], plan: dict[str, Any] | None) -> bool:
        """Serve a version this engine's line wrote after its last checkpoint (restart recovery):
        only the direct successor of the served version, in the served architecture."""
        with self._lock:
            st = self._state
            root = st.root
            if root is None or parent_version != st.served_version or architecture != root.architecture.model_dump():
                return False
            if parent_version is None:
                root.model.load_state_dict(state)
                st.bootstrapped = True
                self.adopt_bootstrap(version)
                return True
            children = [c.node_id for c in st.tree.active_children() if c.architecture == root.architecture]
        self.adopt_merge(MergeOutcome(True, "adopted after restart", state, children, base_version, parent_version,
                                      {}, dict(metrics), plan), version)
        return True

    def adopt_external(self, *, version: int, parent_version: int, architecture: dict[str, Any],
                       state: dict[str, torch.Tensor], base_version: int | None, metrics: dict[str, float],
                       carry_progress: bool, merged_samples: int | None = None) -> bool:
        """Serve a version this engine did not derive: the merge leader's (another learner), or a
        rollback. Only the direct successor of the served version, in the served architecture. With
        ``carry_progress`` the served model keeps what it learned and the new version does not hold
        (task arithmetic: the new version plus this learner's progress): when the leader merged this
        learner's contribution (``merged_samples``: its sample count, as the merge plan names it), the
        progress since that contribution, as a single learner carries its progress since the merge's
        snapshot; otherwise since the last version (carrying from the last version what the leader had
        merged added it a second time). No child counts as merged."""
        with self._lock:
            st = self._state
            root = st.root
            if (root is None or st.served_version is None or parent_version != st.served_version
                    or architecture != root.architecture.model_dump()):
                return False
            merged = self._contributed.get((parent_version, merged_samples)) if merged_samples is not None else None
            since = (merged if merged is not None else st.published_state) if carry_progress else None
            self._contributed = {}
        self.adopt_merge(MergeOutcome(True, "adopted from the served line", state, [], base_version, parent_version,
                                      {}, dict(metrics), None, working_state=since), version)
        return True

    # --- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        with self._lock:
            return encode(self._state)

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            decode(meta, tensors, self._state, self.device)
            self._settle_kl_threshold(meta)

    def _settle_kl_threshold(self, meta: dict[str, Any]) -> None:
        """The settings win over the checkpoint's KL threshold: a checkpointed threshold is kept only
        when it was calibrated at the false-alarm rate still configured (the same calibration, not
        refitted on a reference that has grown since). Otherwise ``kl_threshold`` applies, or, with a
        new ``kl_false_alarm_rate``, the threshold is calibrated again on the restored served model."""
        st, rate = self._state, self.learner_settings.kl_false_alarm_rate
        saved, saved_rate = meta["kl_threshold"], meta.get("kl_calibrated_rate")
        if rate is not None and saved_rate == rate:
            st.thresholds = replace(st.thresholds, kl=saved)
            st.kl_calibrated_rate = rate
            return
        st.kl_calibrated_rate = None
        if rate is not None and st.served_version is not None:
            self._calibrate()
        if st.thresholds.kl != saved:
            log.info("kl_threshold %.4f from the settings replaces the checkpoint's %.4f%s", st.thresholds.kl, saved,
                     f" (calibrated at {saved_rate})" if saved_rate is not None else "")


# contributions of one served version remembered: the leader merges the latest it read, which is this
# learner's last or, when it wrote again while the leader merged, the one before (each a copy of the weights)
_CONTRIBUTIONS_KEPT = 2


def _carry_progress(published: dict[str, torch.Tensor], working_then: dict[str, torch.Tensor] | None,
                    model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adopted weights plus what the served model learned after the merge's snapshot
    (``model`` now minus ``working_then``); the published weights alone when it did not learn."""
    if working_then is None:
        return published
    now = model.state_dict()
    return {k: (v + (now[k].detach().cpu() - working_then[k]) if v.is_floating_point() else v)
            for k, v in published.items()}


def _but_width(arch: Architecture) -> tuple[str, dict[str, Any]]:
    """An architecture up to its width (compact children differ from the served model only there)."""
    return arch.family, {k: v for k, v in arch.params.items() if k != "width"}
