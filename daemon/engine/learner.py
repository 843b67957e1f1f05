"""The per-batch learner: one batch in → measure → decide → train.

Per batch (after bootstrap):
1. split off ``heldout_fraction`` of the rows into the slice's held-out buffer;
2. test-then-train: served accuracy on the whole batch (prequential, the learning served model)
   and KL(batch || served reference) in the published version's features (what followers hold;
   refit only when a version is adopted); the nearest active child by KL in its own features,
   and that child's accuracy on the batch (label-aware routing);
3. :func:`daemon.learn.policy.decide` → keep | retrain nearest child | spawn a child from the
   served model; children train on the new rows plus as many replayed rows of every other slice;
4. the served model learns from the batch too (``train_served``: new rows plus experience-balanced
   replay), so every applied batch helps what is served; followers get that progress through the
   merge job and its gate, never directly;
5. the train rows enter the slice's replay buffer.

Bootstrap publishes the first model when :class:`daemon.learn.bootstrap.BootstrapRule` says so
(``bootstrap_batches`` or ``bootstrap_rows``, then good enough on its held-out rows; or a pause of
the stream, :meth:`Learner.finish_bootstrap_idle`, which trains a model not yet good enough on its
rows first), or as soon as a batch of another slice arrives
(that batch then goes through the decision above): a later slice is never absorbed silently.

The batch is converted to the model's input form once (:class:`Rows`) and passed down. The
caller (the engine facade) holds the lock; nothing here does I/O or starts threads.

Over 400 lines because the steps above share one state and one converted batch; the algorithms
they call (policy, drift, replay, training, inheritance) are in ``daemon/learn``, and supersession's
bookkeeping in :mod:`daemon.engine.superseding`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from consumers.wire import Batch
from daemon.engine.merger import heldout_accuracy, rehearse, split_heldout
from daemon.engine.overlap import Overlap
from daemon.engine.records import BatchResult
from daemon.engine.seeding import node_seed, seeded
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings
from daemon.engine import stages
from daemon.engine.stages import StageClock
from daemon.engine.state import EngineState, PendingCandidate
from daemon.engine.superseding import Superseding
from daemon.engine.tree import ROOT, Node
from daemon.learn.bootstrap import BootstrapRule
from daemon.learn.inherit.child_tuning import child_tuning_hook
from daemon.learn.inherit.hkt import HKTLoss
from daemon.learn.inherit.spawn import compact_architecture, spawn_child
from daemon.learn.merging.confirm import fresh_correctness
from daemon.learn.models import infer_architecture, parameter_count
from daemon.learn.policy import Observation, Verdict, decide, spawn_method
from daemon.learn.training import (CrossEntropy, Hook, accuracy, features_and_logits, fit, model_input,
                                   predict_logits)
from zoo_store.models import utc_now

log = logging.getLogger("filial.engine")

# The first model trains from its initial weights, and a stream of small batches gave it few
# optimizer steps: 5 epochs of a 50-row batch (and as many replayed rows) are 10 steps, and a paused
# bootstrap's patience (4 epochs of 230 rows, 4 steps each) gave up after 16 steps while it was still
# learning. Its epochs, a bootstrap batch's and a pause's, are at least this many rows (10 steps), the
# rows repeated: the first slice is served sooner (README "Bootstrap"). A merge's consolidation fine-
# tunes trained weights and keeps its epochs as they are (measured: no gain there).
FIRST_MODEL_EPOCH_ROWS = 640


@dataclass(frozen=True)
class Observed:
    """What test-then-train measured on a batch, and the published version's view of it."""
    accuracy: float                   # the learning root's (prequential)
    kl: float                         # to the served reference, published version's features
    features: torch.Tensor            # the published version's features of the batch
    published_logits: torch.Tensor


@dataclass(frozen=True)
class Rows:
    """One batch split into train and held-out rows, in wire form (for the buffers, which store
    the compact wire dtype) and in model form (computed once, for everything that runs a model)."""
    slice: str
    data_type: str
    x: torch.Tensor          # the whole batch, model form
    y: torch.Tensor
    x_train_wire: torch.Tensor
    x_train: torch.Tensor    # model form
    y_train: torch.Tensor
    x_held_wire: torch.Tensor
    y_held: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.y)


class Learner:
    def __init__(self, model: ModelSettings, learner: LearnerSettings, merge: MergeSettings,
                 device: torch.device, overlap: Overlap) -> None:
        self.model = model
        self.s = learner
        self.merge = merge   # when a merge is due; its consolidate_* settings also train a first model through a pause
        self.device = device
        self.overlap = overlap  # the observation's two forward passes at once, where a core is free
        self.clock = StageClock()  # this batch's seconds per stage (one batch at a time: the engine's lock)
        self.superseding = Superseding(learner.min_spawn_rows, model.num_classes)
        self._bootstrap_rule = BootstrapRule(learner.bootstrap_batches, learner.bootstrap_rows,
                                             learner.bootstrap_accuracy)

    # --- one batch ------------------------------------------------------------------------------
    def split(self, state: EngineState, batch: Batch) -> Rows:
        n = len(batch)
        n_held = max(1, int(round(n * self.s.heldout_fraction))) if n > 1 else 0
        order = torch.randperm(n, generator=state.generator)
        held, train = order[:n_held], order[n_held:]
        x = model_input(batch.x, batch.data_type)
        return Rows(batch.slice, batch.data_type, x, batch.y, batch.x[train], x[train], batch.y[train],
                    batch.x[held], batch.y[held])

    def apply(self, state: EngineState, batch: Batch, clock: StageClock | None = None) -> BatchResult:
        self.clock = clock or StageClock()
        evicted = self._admit_slice(state, batch.slice)
        with self.clock(stages.SPLIT):
            rows = self.split(state, batch)
        if state.bootstrapped:
            result = self._decide_and_train(state, rows)
        elif state.root is not None and rows.slice not in state.root.slices:
            self._finish_bootstrap(state, f"a batch of a new slice {rows.slice!r} arrived after "
                                          f"{state.bootstrap_batches_seen} batches of {state.root.slices}")
            result = replace(self._decide_and_train(state, rows), publish_bootstrap=True)
        else:
            result = self._bootstrap(state, batch, rows)
        with self.clock(stages.BUFFERS):
            state.buffers.add(rows.slice, rows.x_train_wire, rows.y_train, rows.x_held_wire, rows.y_held,
                              state.generator)
        state.counters.batches += 1
        state.counters.samples += rows.size
        state.slice_last_batch[rows.slice] = state.counters.batches
        return replace(result, evicted_slice=evicted, stages=dict(self.clock.seconds))

    def _admit_slice(self, state: EngineState, name: str) -> str | None:
        """A new slice name beyond ``max_slices`` evicts the least recently seen slice (returned)."""
        known = state.known_slices()
        if name in known or len(known) < self.s.max_slices:
            return None
        oldest = min(known, key=lambda s: (state.slice_last_batch.get(s, 0), s))
        state.forget_slice(oldest)
        log.warning("slice %r is new and %d slices are held (max_slices): evicted the least recently seen, %r "
                    "(its buffers and accuracy bookkeeping; the models keep what they learned from it)",
                    name, len(known), oldest)
        return oldest

    # --- training sets --------------------------------------------------------------------------------
    def _training_set(self, state: EngineState, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """New rows plus ``replay_ratio`` as many replayed rows of the other slices (experience replay)."""
        replay = state.buffers.sample_replay(int(len(rows.y_train) * self.s.replay_ratio), state.generator,
                                             learning=rows.slice)
        if replay is None:
            return rows.x_train, rows.y_train
        return (torch.cat([rows.x_train, model_input(replay[0], rows.data_type)]),
                torch.cat([rows.y_train, replay[1]]))

    def _train(self, state: EngineState, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               epochs: int, hooks: tuple[Hook, ...] = (), loss=None) -> None:
        loss = loss if loss is not None else CrossEntropy(self.s.label_smoothing)
        fit(model, x, y, epochs=epochs, lr=self.s.learning_rate, batch_size=self.s.train_batch_size,
            loss=loss, hooks=hooks, generator=state.generator)

    def grow_reference(self, state: EngineState, node: Node, x_wire: torch.Tensor) -> None:
        ref = torch.cat([node.reference_x, x_wire]) if len(node.reference_x) else x_wire.clone()
        if len(ref) > self.s.reference_size:
            keep = torch.randperm(len(ref), generator=state.generator)[: self.s.reference_size]
            ref = ref[keep]
        node.reference_x = ref

    # --- bootstrap -------------------------------------------------------------------------------------
    def _new_root(self, state: EngineState, batch: Batch) -> Node:
        arch = infer_architecture(batch.data_type, batch.x, self.model.num_classes, self.model.width,
                                  family=self.model.family, factory=self.model.factory)
        with seeded(node_seed(self.s.seed, ROOT)):
            model = arch.build().to(self.device)
        node = Node(node_id=ROOT, parent=None, slice=batch.slice, data_type=batch.data_type, architecture=arch,
                    model=model, created_at=utc_now(), reference_x=batch.x[:0],
                    fingerprint=None, status="served", slices=[batch.slice])
        state.tree.add(node)
        log.info("served model: %s (%d parameters)", arch.model_dump(), parameter_count(model))
        return node

    def _bootstrap(self, state: EngineState, batch: Batch, rows: Rows) -> BatchResult:
        with self.clock(stages.BOOTSTRAP):
            root = state.root or self._new_root(state, batch)
            acc = float(accuracy(root.model, rows.x, rows.y)) if state.bootstrap_batches_seen else float("nan")
            x_fit, y_fit = self._training_set(state, rows)
            repeats = math.ceil(FIRST_MODEL_EPOCH_ROWS / max(len(y_fit), 1))   # 1 for a batch that large
            self._train(state, root.model, x_fit.repeat(repeats, *[1] * (x_fit.dim() - 1)), y_fit.repeat(repeats),
                        self.s.bootstrap_epochs)
            root.samples += len(rows.y_train)
            self.grow_reference(state, root, rows.x_train_wire)
            state.bootstrap_batches_seen += 1
            state.bootstrap_rows_seen += rows.size
            verdict = self._bootstrap_rule.verdict(state.bootstrap_batches_seen, state.bootstrap_rows_seen,
                                                   lambda: self._heldout_accuracy(state, rows))
        if verdict.capped:
            log.warning("bootstrap: %s; serving anyway", verdict.reason)
        if verdict.done:
            self._finish_bootstrap(state, verdict.reason)
        return BatchResult(rows.slice, rows.size, "bootstrap", verdict.reason, None, acc, False,
                           publish_bootstrap=verdict.done)

    def _finish_bootstrap(self, state: EngineState, why: str) -> None:
        state.bootstrapped = True
        with self.clock(stages.FINGERPRINT):
            state.root.refresh_fingerprint()
        log.info("bootstrap done: %s; publishing the first served model", why)

    def _heldout_accuracy(self, state: EngineState, rows: Rows | None = None) -> dict[str, float]:
        """The learning root's accuracy on each slice's held-out rows, this batch's included (they
        enter the buffer after the batch)."""
        sets = state.buffers.heldout_sets()
        if rows is not None and len(rows.y_held):
            x, y = sets.get(rows.slice, (rows.x_held_wire[:0], rows.y_held[:0]))
            sets[rows.slice] = (torch.cat([x, rows.x_held_wire]), torch.cat([y, rows.y_held]))
        root = state.root
        return {name: accuracy(root.model, model_input(x, root.data_type), y) for name, (x, y) in sets.items()}

    def finish_bootstrap_idle(self, state: EngineState, idle_seconds: float) -> bool:
        """The stream paused during bootstrap: no rows are coming for now, so the batch and row minimums
        are waived and the first model is finished if it is good enough on the held-out rows so far."""
        if state.bootstrapped or state.root is None or not state.bootstrap_batches_seen:
            return False
        self.clock = StageClock()
        verdict = self._bootstrap_rule.verdict(state.bootstrap_batches_seen, state.bootstrap_rows_seen,
                                               lambda: self._heldout_accuracy(state), idle=True)
        trained = ""
        if not verdict.done and self.merge.consolidate_epochs:
            judged, trained = self._train_while_idle(state)
            verdict = self._bootstrap_rule.verdict(state.bootstrap_batches_seen, state.bootstrap_rows_seen,
                                                   lambda: judged, idle=True)
            trained = f"; {trained}"
        if not verdict.done:
            log.info("bootstrap: ingest idle for %.0fs%s, %s", idle_seconds, trained, verdict.reason)
            return False
        self._finish_bootstrap(state, f"ingest idle for {idle_seconds:.0f}s{trained}; {verdict.reason}")
        return True

    def _train_while_idle(self, state: EngineState) -> tuple[dict[str, float], str]:
        """The stream paused before the first model was good enough. A burst of a few hundred rows gave
        it only a few dozen optimizer steps, and the pause leaves the CPU free, so it trains on its
        slice's replay rows as a merge consolidates (:func:`daemon.engine.merger.rehearse`: the even
        held-out rows choose the epoch), in epochs of at least ``FIRST_MODEL_EPOCH_ROWS``. Returns its
        accuracy on the odd held-out rows, which chose nothing, and what was done (for the log)."""
        root = state.root
        select, judge = split_heldout(state.buffers.heldout_sets())
        replay = state.buffers.replay_sets()
        if not replay or not judge:
            return {}, "nothing to train on yet"
        with self.clock(stages.BOOTSTRAP):
            report = rehearse(root.model, replay, select, root.data_type, self.merge, self.s,
                              state.generator, min_epoch_rows=FIRST_MODEL_EPOCH_ROWS)
        best = f" (best {report['best_epoch']})" if "best_epoch" in report else ""
        stored = sum(len(y) for _, y in replay.values())
        return (heldout_accuracy(root.model, root.data_type, judge),
                f"trained while idle: {report['epochs']} epochs{best} of {report['rows_per_slice'] * report['slices']} "
                f"rows from its {stored} replay rows")

    # --- after bootstrap -------------------------------------------------------------------------------
    def _observe(self, state: EngineState, rows: Rows) -> Observed:
        """The learning root's accuracy on the batch (prequential, test-then-train) and the batch's KL
        to the served reference in the published version's features (where the fingerprint was fit);
        the published version's features and logits come from the same pass, which runs beside the
        root's (:class:`daemon.engine.overlap.Overlap`) once a version is published."""
        root = state.root
        published = state.published_model()
        pending = self._pending(state)
        if published is root.model:  # before a first version: one pass gives both
            features, logits = features_and_logits(root.model, rows.x)
            published_logits = logits
        else:
            def learning_passes() -> tuple[torch.Tensor, torch.Tensor | None]:
                return (predict_logits(root.model, rows.x),
                        predict_logits(self._candidate_model(state, pending), rows.x) if pending else None)

            (logits, candidate_logits), (features, published_logits) = self.overlap.both(
                learning_passes, lambda: features_and_logits(published, rows.x))
            if pending is not None:
                self._confirm(pending, rows, published_logits, candidate_logits)
        correct = float((logits.argmax(1) == rows.y).float().mean())
        c, n = state.prequential.setdefault(rows.slice, [0.0, 0])
        state.prequential[rows.slice] = [c + correct * rows.size, n + rows.size]
        return Observed(correct, root.fingerprint.score(features), features, published_logits)

    @staticmethod
    def _pending(state: EngineState) -> PendingCandidate | None:
        """The candidate held for confirmation, while it still waits and was judged against the version
        served now (another version adopted since makes its evidence moot: dropped)."""
        pending = state.pending
        if pending is not None and pending.served_version != state.served_version:
            state.pending = pending = None
        return pending if pending is not None and pending.confirmation.confirmed is None else None

    @staticmethod
    def _candidate_model(state: EngineState, pending: PendingCandidate) -> torch.nn.Module:
        if pending.model is None:
            device = next(state.root.model.parameters()).device
            pending.model = state.root.architecture.build_with(pending.outcome.state, device)
        return pending.model

    @staticmethod
    def _confirm(pending: PendingCandidate, rows: Rows, published_logits: torch.Tensor,
                 candidate_logits: torch.Tensor) -> None:
        """Judge the held candidate again with this batch's rows, which neither model has trained on
        (:mod:`daemon.learn.merging.confirm`); once confirmed, a merge is due and publishes it."""
        verdict = pending.confirmation.update(rows.slice, fresh_correctness(published_logits, rows.y),
                                              fresh_correctness(candidate_logits, rows.y))
        if verdict.accepted:
            pending.model = None
            log.info("merge candidate confirmed on %d fresh rows (look %d): %s", pending.confirmation.fresh_rows,
                     pending.confirmation.looks, verdict.reason)

    @staticmethod
    def _expected_accuracy(state: EngineState, slice_name: str, min_rows: int = 100) -> float | None:
        """The served model's prequential accuracy so far on this slice, or over every slice when
        this one has fewer than ``min_rows`` rows measured (what a concept drift is measured against)."""
        c, n = state.prequential.get(slice_name, (0.0, 0))
        if n >= min_rows:
            return c / n
        c = sum(v[0] for v in state.prequential.values())
        n = sum(v[1] for v in state.prequential.values())
        return c / n if n >= min_rows else None

    def _decide_and_train(self, state: EngineState, rows: Rows) -> BatchResult:
        expected = self._expected_accuracy(state, rows.slice)
        with self.clock(stages.OBSERVE):
            observed = self._observe(state, rows)
        acc, kl = observed.accuracy, observed.kl
        if acc >= state.thresholds.accuracy:  # kept whatever the children would say: do not run them
            nearest, nearest_kl, nearest_acc = None, None, None
        else:
            with self.clock(stages.ROUTE):
                nearest, nearest_kl, nearest_acc = state.tree.nearest_child(rows.x, rows.data_type, rows.y)
        verdict: Verdict = decide(Observation(acc, kl, nearest.node_id if nearest else None, nearest_kl,
                                              nearest_acc, expected, rows.size), state.thresholds,
                                  served_learns=self.s.train_served)
        if verdict.action == "spawn" and rows.size < self.s.min_spawn_rows:
            verdict = Verdict("keep", f"{verdict.reason}; but {rows.size} rows < min_spawn_rows "
                                      f"{self.s.min_spawn_rows}: evaluated, no child spawned", verdict.drift)
        if verdict.action == "spawn":
            verdict = self._within_max_children(state, verdict, nearest)
        if verdict.drift:
            state.counters.drift_events += 1
        superseded = None
        if self.s.supersede:
            with self.clock(stages.SUPERSEDE):
                superseded = self.superseding.apply(state, rows.slice, rows.data_type, rows.y,
                                                    observed.published_logits.argmax(1), observed.features)
        if superseded is not None:
            verdict = replace(verdict, reason=f"{verdict.reason}; {superseded.describe()}: {superseded.slice!r} "
                                              f"superseded")
        child_id = None
        if verdict.action == "retrain":
            child = state.tree.nodes[verdict.child]
            self._update_child(state, child, rows)
            state.counters.children_retrained += 1
            child_id = child.node_id
        elif verdict.action == "spawn":
            child = self._spawn(state, rows)
            state.counters.children_spawned += 1
            child_id = child.node_id
        trained = verdict.action in ("retrain", "spawn")
        if self.s.train_served:
            self._update_served(state, rows, in_distribution=verdict.action == "keep")
            trained = True
        merge_due = False
        if trained:
            state.counters.child_updates_since_merge += 1
            merge_due = state.counters.child_updates_since_merge >= self.merge.after_child_updates
        if state.pending is not None and state.pending.confirmation.confirmed is not None:
            merge_due = True  # the held candidate is confirmed: the merge publishes it
        return BatchResult(rows.slice, rows.size, verdict.action, verdict.reason, kl, acc, verdict.drift,
                           child=child_id, nearest_kl=nearest_kl, merge_due=merge_due,
                           superseded_slice=superseded.slice if superseded else None)

    def _within_max_children(self, state: EngineState, verdict: Verdict, nearest: Node | None) -> Verdict:
        """At ``max_children`` a spawn becomes a retrain of the nearest child: nothing learned is
        discarded, and the per-batch cost (one forward pass per child) stays bounded."""
        active = len(state.tree.active_children())
        if active < self.s.max_children:
            return verdict
        if nearest is None:
            return Verdict("keep", f"{verdict.reason}; but {active} active children (max_children "
                                   f"{self.s.max_children}) and none of this data type: no child spawned",
                           verdict.drift)
        log.info("max_children %d reached: retraining the nearest child %s instead of spawning",
                 self.s.max_children, nearest.node_id)
        return Verdict("retrain", f"{verdict.reason}; but {active} active children (max_children "
                                  f"{self.s.max_children}): retraining the nearest child {nearest.node_id} instead",
                       verdict.drift, nearest.node_id)

    def _update_served(self, state: EngineState, rows: Rows, in_distribution: bool) -> None:
        """The served model learns the batch plus experience-balanced replay. Rows it already copes
        with join its reference (the distribution it serves); drifted rows join when a merge brings
        their child in. Its fingerprint lives in the published version's features, refit when a
        version is adopted (:meth:`EngineState.published_model`); only before the first version,
        when drift is measured in its own moving features, is it refit here."""
        root = state.root
        with self.clock(stages.TRAIN_SERVED):
            x_fit, y_fit = self._training_set(state, rows)
            self._train(state, root.model, x_fit, y_fit, self.s.child_epochs)
            root.samples += len(rows.y_train)
            if in_distribution:
                self.grow_reference(state, root, rows.x_train_wire)
        if state.published_state is None:
            with self.clock(stages.FINGERPRINT):
                root.refresh_fingerprint()
        state.counters.served_updates += 1

    def _update_child(self, state: EngineState, child: Node, rows: Rows) -> None:
        """Train an existing child on the new rows plus replay. A compact child keeps inheriting
        from the served model through HKT; a same-size child trains on cross-entropy (with
        Child-Tuning's gradient mask when configured)."""
        with self.clock(stages.TRAIN_CHILDREN):
            x_fit, y_fit = self._training_set(state, rows)
            if child.architecture != state.root.architecture:
                with seeded(node_seed(self.s.seed, f"{child.node_id}.{child.updates}")):  # HKT's projections
                    self._train(state, child.model, x_fit, y_fit, self.s.child_epochs,
                                loss=HKTLoss(state.root.model))
            else:
                hooks = ((child_tuning_hook(child.model, x_fit, y_fit, mode=self.s.child_tuning,
                                            p=self.s.child_tuning_p, batch_size=self.s.train_batch_size,
                                            generator=state.generator),)
                         if self.s.child_tuning != "none" else ())
                self._train(state, child.model, x_fit, y_fit, self.s.child_epochs, hooks=hooks)
        self._note_trained(state, child, rows)

    def _note_trained(self, state: EngineState, child: Node, rows: Rows) -> None:
        child.updates += 1
        child.samples += len(rows.y_train)
        if rows.slice not in child.slices:
            child.slices.append(rows.slice)
        self.grow_reference(state, child, rows.x_train_wire)
        with self.clock(stages.FINGERPRINT):
            child.refresh_fingerprint()

    def _spawn(self, state: EngineState, rows: Rows) -> Node:
        """A child that inherits from the served model: a copy (same size) or a compact child
        trained with hereditary knowledge transfer; which one, by :func:`daemon.learn.policy.spawn_method`."""
        root = state.root
        compact = self.s.child_size_ratio < 1.0
        arch = compact_architecture(root.architecture, self.s.child_size_ratio) if compact else root.architecture
        method = spawn_method(self.s.spawn_method, compact=compact)
        x_fit, y_fit = self._training_set(state, rows)
        tuning = self.s.child_tuning if method == "copy" and self.s.child_tuning != "none" else None
        node_id = state.tree.new_child_id()
        # a fresh or compact child draws its initial weights
        with self.clock(stages.TRAIN_CHILDREN), seeded(node_seed(self.s.seed, node_id)):
            model = spawn_child(root.model, arch if compact else None, x_fit, y_fit,
                                epochs=self.s.child_epochs, lr=self.s.learning_rate,
                                batch_size=self.s.train_batch_size, label_smoothing=self.s.label_smoothing,
                                method=method, child_tuning=tuning,
                                child_tuning_p=self.s.child_tuning_p, generator=state.generator)
        child = Node(node_id=node_id, parent=ROOT, slice=rows.slice, data_type=rows.data_type,
                     architecture=arch, model=model, created_at=utc_now(),
                     reference_x=rows.x_train_wire[:0], fingerprint=None, status="active",
                     base_version=state.served_version, slices=[], spawn_method=method)
        state.tree.add(child)
        self._note_trained(state, child, rows)
        log.info("spawned child %s (%s, %s, %d parameters) for slice %s from served v%s", child.node_id, method,
                 "compact" if compact else "full size", parameter_count(model), rows.slice, state.served_version)
        return child
