"""The continual learner: one batch in → measure → decide → train; merges on request.

No I/O here: the service feeds batches, publishes what the engine asks it to, and persists
:meth:`Engine.checkpoint`. Everything that touches the tree happens under ``self.lock``; the
expensive part of a merge (combining and evaluating candidates) runs on a snapshot, outside
the lock, so ingest continues while a merge is computed.

Per batch (after bootstrap):
1. split off ``heldout_fraction`` of the rows into the slice's held-out buffer;
2. test-then-train: served accuracy on the whole batch (prequential) and KL(batch || served
   reference) in the served model's features; for each active child, KL in its own features;
3. :func:`daemon.learn.policy.decide` → keep | retrain nearest child | spawn a child from the served
   model; children train on the new rows plus as many replayed rows of every other slice;
4. the train rows enter the slice's replay buffer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from consumers.wire import Batch, BatchSource
from daemon.learn.buffers import SliceBuffers
from daemon.learn.child_tuning import child_tuning_hook
from daemon.learn.distill import distill_into
from daemon.learn.drift import calibrate_threshold
from daemon.learn.families import Architecture, infer_architecture, parameter_count
from daemon.learn.gate import GateVerdict, gate
from daemon.learn.granularity import apply_plan, choose_plan
from daemon.learn.hkt import compact_architecture, known_classes, spawn_child, train_hkt
from daemon.learn.policy import Observation, Thresholds, Verdict, decide, spawn_method
from daemon.service.settings import Settings
from daemon.learn.training import accuracy, embed, model_input, train_epochs
from daemon.engine.tree import ROOT, ModelTree, Node
from zoo_store.models import utc_now

log = logging.getLogger("filial.engine")


@dataclass
class Counters:
    batches: int = 0
    samples: int = 0
    duplicates_skipped: int = 0
    drift_events: int = 0
    children_spawned: int = 0
    children_retrained: int = 0
    merges_accepted: int = 0
    merges_rejected: int = 0
    child_updates_since_merge: int = 0


@dataclass(frozen=True)
class BatchResult:
    """What the engine did with one batch; the service logs and records it."""
    slice: str
    rows: int
    action: str
    reason: str
    kl: float | None
    accuracy: float | None
    drift: bool
    child: str | None = None
    nearest_kl: float | None = None
    publish_bootstrap: bool = False
    merge_due: bool = False
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass
class MergeOutcome:
    accepted: bool
    reason: str
    state: dict[str, torch.Tensor] | None
    children: list[str]
    base_version: int | None
    served_version: int | None
    served_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    plan: dict[str, Any] | None = None
    verdict: GateVerdict | None = None
    seconds: float = 0.0
    # compact children after learning back from the candidate (distillation's second direction),
    # with the ``updates`` count they had when snapshotted: adopted only if still unchanged
    distilled_children: dict[str, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "children": self.children,
                "base_version": self.base_version, "served_version": self.served_version,
                "served_metrics": self.served_metrics, "candidate_metrics": self.candidate_metrics,
                "plan": self.plan, "seconds": round(self.seconds, 3),
                "regressions": [asdict(r) for r in self.verdict.regressions] if self.verdict else []}


@dataclass(frozen=True)
class ChildRelease:
    """A compact child ready to publish on its own line (``{line}.{node_id}``)."""
    node_id: str
    updates: int
    architecture: Architecture
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    parent_version: int
    lineage: list[dict[str, Any]]


class Engine:
    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.s = settings
        self.device = device
        self.lock = threading.RLock()
        self.tree = ModelTree()
        self.buffers = SliceBuffers(settings.learner.replay_per_slice, settings.learner.heldout_per_slice)
        self.counters = Counters()
        self.generator = torch.Generator().manual_seed(0)
        self.thresholds = Thresholds(kl=settings.learner.kl_threshold, accuracy=settings.learner.accuracy_threshold)
        self.served_version: int | None = None
        self.base_version: int | None = None
        self.base_state: dict[str, torch.Tensor] | None = None
        self.bootstrap_batches_seen = 0
        self.applied_offsets: dict[str, int] = {}      # "topic:partition" -> next offset to apply
        self.recent_batch_ids: deque[str] = deque(maxlen=100_000)
        self._recent_ids_set: set[str] = set()
        self.prequential: dict[str, list[float]] = {}  # slice -> [correct, seen]
        self._last_merge_signature: tuple = ()         # (child id, updates) of the last merge attempt

    # --- queries -------------------------------------------------------------------------------
    @property
    def root(self) -> Node | None:
        return self.tree.root

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        root = self.root
        return {root.data_type: tuple(root.reference_x.shape[1:])} if root is not None else {}

    def prequential_accuracy(self) -> dict[str, float]:
        return {s: c / n for s, (c, n) in sorted(self.prequential.items()) if n}

    def already_applied(self, batch: Batch) -> bool:
        src = batch.source
        if src is not None and src.offset < self.applied_offsets.get(f"{src.topic}:{src.partition}", 0):
            return True
        return batch.batch_id is not None and batch.batch_id in self._recent_ids_set

    def knows_batch(self, batch_id: str) -> bool:
        """Whether a batch with this producer id was applied (within the last ``maxlen`` ids)."""
        with self.lock:
            return batch_id in self._recent_ids_set

    def applied_offset(self, partition_key: str) -> int:
        with self.lock:
            return self.applied_offsets.get(partition_key, 0)

    def forget_partition(self, partition_key: str, reason: str) -> None:
        """The broker's log for this partition was reset (e.g. a memory-only broker restarted):
        its offsets no longer name the batches applied, so stop skipping by offset; replays are
        still recognised by batch id."""
        with self.lock:
            dropped = self.applied_offsets.pop(partition_key, None)
        log.warning("forgot applied offset %s of %s: %s", dropped, partition_key, reason)

    # --- per batch -----------------------------------------------------------------------------------
    def process(self, batch: Batch) -> BatchResult:
        started = time.perf_counter()
        with self.lock:
            if self.already_applied(batch):
                self.counters.duplicates_skipped += 1
                self._mark_applied(batch)
                return BatchResult(batch.slice, len(batch), "skip", "already applied (replayed batch)",
                                   None, None, False)
            x_train, y_train, x_held, y_held = self._split(batch)
            if self.served_version is None:
                result = self._bootstrap(batch, x_train, y_train)
            else:
                result = self._decide_and_train(batch, x_train, y_train)
            self.buffers.add(batch.slice, x_train, y_train, x_held, y_held, self.generator)
            self.counters.batches += 1
            self.counters.samples += len(batch)
            self._mark_applied(batch)
        return replace(result, seconds=time.perf_counter() - started)

    def note_skipped(self, source: BatchSource) -> None:
        """A message that was dead-lettered: its offset may be committed with the next checkpoint."""
        with self.lock:
            self._advance(source)

    def _advance(self, source: BatchSource) -> None:
        key = f"{source.topic}:{source.partition}"
        self.applied_offsets[key] = max(self.applied_offsets.get(key, 0), source.offset + 1)

    def _mark_applied(self, batch: Batch) -> None:
        if batch.source is not None:
            self._advance(batch.source)
        if batch.batch_id is not None and batch.batch_id not in self._recent_ids_set:
            if len(self.recent_batch_ids) == self.recent_batch_ids.maxlen:
                self._recent_ids_set.discard(self.recent_batch_ids[0])
            self.recent_batch_ids.append(batch.batch_id)
            self._recent_ids_set.add(batch.batch_id)

    def _split(self, batch: Batch):
        n = len(batch)
        n_held = max(1, int(round(n * self.s.learner.heldout_fraction))) if n > 1 else 0
        order = torch.randperm(n, generator=self.generator)
        held, train = order[:n_held], order[n_held:]
        return batch.x[train], batch.y[train], batch.x[held], batch.y[held]

    def _training_set(self, slice_name: str, x: torch.Tensor, y: torch.Tensor):
        """New rows plus ``replay_ratio`` as many replayed rows of the other slices (experience replay)."""
        replay = self.buffers.sample_replay(int(len(y) * self.s.learner.replay_ratio), self.generator, learning=slice_name)
        if replay is not None:
            x, y = torch.cat([x, replay[0]]), torch.cat([y, replay[1]])
        return x, y

    def _train(self, model, data_type: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
        return train_epochs(model, model_input(x, data_type), y, epochs=epochs, lr=self.s.learner.learning_rate,
                            batch_size=self.s.learner.train_batch_size, device=self.device, generator=self.generator)

    def _observe(self, batch: Batch, x_model: torch.Tensor) -> tuple[float, float]:
        root = self.root
        correct = float(accuracy(root.model, x_model, batch.y))
        c, n = self.prequential.setdefault(batch.slice, [0.0, 0])
        self.prequential[batch.slice] = [c + correct * len(batch), n + len(batch)]
        return correct, root.kl_to(x_model)

    def _new_root(self, batch: Batch) -> Node:
        arch = infer_architecture(batch.data_type, batch.x, self.s.model.num_classes, self.s.model.width,
                                  family=self.s.model.family, factory=self.s.model.factory)
        model = arch.build().to(self.device)
        empty = batch.x[:0]
        node = Node(node_id=ROOT, parent=None, slice=batch.slice, data_type=batch.data_type, architecture=arch,
                    model=model, created_at=utc_now(), reference_x=empty,
                    fingerprint=None, status="served", slices=[batch.slice])
        self.tree.add(node)
        log.info("served model: %s (%d parameters)", arch.model_dump(), parameter_count(model))
        return node

    def _grow_reference(self, node: Node, x: torch.Tensor) -> None:
        ref = torch.cat([node.reference_x, x]) if len(node.reference_x) else x.clone()
        if len(ref) > self.s.learner.reference_size:
            keep = torch.randperm(len(ref), generator=self.generator)[: self.s.learner.reference_size]
            ref = ref[keep]
        node.reference_x = ref

    def _bootstrap(self, batch: Batch, x_train, y_train) -> BatchResult:
        root = self.root or self._new_root(batch)
        if batch.slice not in root.slices:
            root.slices.append(batch.slice)
        x_model = model_input(batch.x, batch.data_type)
        acc = float(accuracy(root.model, x_model, batch.y)) if self.bootstrap_batches_seen else float("nan")
        x_fit, y_fit = self._training_set(batch.slice, x_train, y_train)
        self._train(root.model, batch.data_type, x_fit, y_fit, self.s.learner.bootstrap_epochs)
        root.samples += len(y_train)
        self._grow_reference(root, x_train)
        self.bootstrap_batches_seen += 1
        done = self._bootstrap_done()
        if done:
            root.refresh_fingerprint()
        return BatchResult(batch.slice, len(batch), "bootstrap",
                           f"training the first served model ({self.bootstrap_batches_seen}/{self.s.learner.bootstrap_batches})",
                           None, acc, False, publish_bootstrap=done)

    def _bootstrap_done(self) -> bool:
        """Enough batches, and good enough on its own held-out rows to be worth serving
        (a weak first model would call its own slice drift); capped at 4x the batches."""
        seen, wanted = self.bootstrap_batches_seen, self.s.learner.bootstrap_batches
        if seen < wanted:
            return False
        held = self.buffers.heldout_sets()
        accs = [accuracy(self.root.model, model_input(x, self.root.data_type), y) for x, y in held.values()]
        good = bool(accs) and min(accs) >= self.s.learner.bootstrap_accuracy
        if not good and seen >= 4 * wanted:
            log.warning("bootstrap: held-out accuracy %s still below %.2f after %d batches; serving anyway",
                        [round(a, 3) for a in accs], self.s.learner.bootstrap_accuracy, seen)
            return True
        return good

    def _decide_and_train(self, batch: Batch, x_train, y_train) -> BatchResult:
        x_model = model_input(batch.x, batch.data_type)
        acc, kl = self._observe(batch, x_model)
        nearest, nearest_kl = self.tree.nearest_child(x_model, batch.data_type)
        verdict: Verdict = decide(Observation(acc, kl, nearest.node_id if nearest else None, nearest_kl),
                                  self.thresholds)
        if verdict.drift:
            self.counters.drift_events += 1
        child_id = None
        if verdict.action == "retrain":
            child = self.tree.nodes[verdict.child]
            self._update_child(child, batch, x_train, y_train)
            self.counters.children_retrained += 1
            child_id = child.node_id
        elif verdict.action == "spawn":
            child = self._spawn(batch, x_train, y_train)
            self.counters.children_spawned += 1
            child_id = child.node_id
        merge_due = False
        if verdict.action in ("retrain", "spawn"):
            self.counters.child_updates_since_merge += 1
            merge_due = self.counters.child_updates_since_merge >= self.s.merge.after_child_updates
        return BatchResult(batch.slice, len(batch), verdict.action, verdict.reason, kl, acc, verdict.drift,
                           child=child_id, nearest_kl=nearest_kl, merge_due=merge_due)

    def _update_child(self, child: Node, batch: Batch, x_train, y_train) -> None:
        """Train an existing child on the new rows plus replay. A compact child keeps inheriting
        from the served model through HKT; a same-size child trains on cross-entropy (with
        Child-Tuning's gradient mask when configured)."""
        x_fit, y_fit = self._training_set(batch.slice, x_train, y_train)
        x_model = model_input(x_fit, batch.data_type)
        if child.architecture != self.root.architecture:
            train_hkt(self.root.model, child.model, x_model, y_fit, epochs=self.s.learner.child_epochs,
                      lr=self.s.learner.learning_rate, batch_size=self.s.learner.train_batch_size, generator=self.generator)
        else:
            mask = (child_tuning_hook(child.model, x_model, y_fit, mode=self.s.learner.child_tuning,
                                      p=self.s.learner.child_tuning_p, batch_size=self.s.learner.train_batch_size,
                                      generator=self.generator)
                    if self.s.learner.child_tuning != "none" else None)
            train_epochs(child.model, x_model, y_fit, epochs=self.s.learner.child_epochs, lr=self.s.learner.learning_rate,
                         batch_size=self.s.learner.train_batch_size, device=self.device, generator=self.generator,
                         before_step=mask)
        self._note_trained(child, batch, x_train, y_train)

    def _note_trained(self, child: Node, batch: Batch, x_train, y_train) -> None:
        child.updates += 1
        child.samples += len(y_train)
        if batch.slice not in child.slices:
            child.slices.append(batch.slice)
        self._grow_reference(child, x_train)
        child.refresh_fingerprint()

    def _spawn(self, batch: Batch, x_train, y_train) -> Node:
        """A child that inherits from the served model: a copy (same size) or a compact child
        trained with hereditary knowledge transfer; which one, by :func:`daemon.learn.policy.spawn_method`."""
        root = self.root
        compact = self.s.learner.child_size_ratio < 1.0
        arch = compact_architecture(root.architecture, self.s.learner.child_size_ratio) if compact else root.architecture
        x_new = model_input(x_train, batch.data_type)
        knows = known_classes(root.model, x_new, y_train) >= 0.5
        method = spawn_method(self.s.learner.spawn_method, compact=compact, parent_knows_classes=knows)
        x_fit, y_fit = self._training_set(batch.slice, x_train, y_train)
        tuning = self.s.learner.child_tuning if method == "copy" and self.s.learner.child_tuning != "none" else None
        model = spawn_child(root.model, arch if compact else None, model_input(x_fit, batch.data_type), y_fit,
                            epochs=self.s.learner.child_epochs, lr=self.s.learner.learning_rate,
                            batch_size=self.s.learner.train_batch_size, method=method, child_tuning=tuning,
                            child_tuning_p=self.s.learner.child_tuning_p, generator=self.generator)
        child = Node(node_id=self.tree.new_child_id(), parent=ROOT, slice=batch.slice, data_type=batch.data_type,
                     architecture=arch, model=model, created_at=utc_now(),
                     reference_x=batch.x[:0], fingerprint=None, status="active",
                     base_version=self.served_version, slices=[], spawn_method=method)
        self.tree.add(child)
        self._note_trained(child, batch, x_train, y_train)
        log.info("spawned child %s (%s, %s, %d parameters; served model knows the slice's classes: %s) "
                 "for slice %s from served v%s", child.node_id, method, "compact" if compact else "full size",
                 parameter_count(model), knows, batch.slice, self.served_version)
        return child

    # --- publishing hooks (called by the service after a successful publish) ----------------------------
    def served_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return _cpu_state(self.root.model)

    def compact_children_to_publish(self) -> list["ChildRelease"]:
        """Compact children trained since they were last published on their own model line."""
        with self.lock:
            root = self.root
            if root is None or self.served_version is None:
                return []
            return [ChildRelease(c.node_id, c.updates, c.architecture, _cpu_state(c.model), self.metrics(c.model),
                                 self.served_version, [root.describe_lineage(), c.describe_lineage()])
                    for c in self.tree.active_children()
                    if c.architecture != root.architecture and c.updates > c.published_updates]

    def child_published(self, release: "ChildRelease") -> None:
        with self.lock:
            node = self.tree.nodes.get(release.node_id)
            if node is not None:
                node.published_updates = max(node.published_updates, release.updates)

    def adopt_bootstrap(self, version: int) -> None:
        with self.lock:
            self.served_version = version
            self.base_version = version
            self.base_state = self.served_state()
            self.root.base_version = version
            self._calibrate(self.root)

    def _calibrate(self, node: Node) -> None:
        if self.s.learner.kl_false_alarm_rate is None:
            return
        feats = embed(node.model, model_input(node.reference_x, node.data_type))
        self.thresholds = Thresholds(kl=calibrate_threshold(feats, self.s.learner.train_batch_size,
                                                            self.s.learner.kl_false_alarm_rate),
                                     accuracy=self.thresholds.accuracy)
        log.info("calibrated kl_threshold %.4f at false-alarm rate %s", self.thresholds.kl, self.s.learner.kl_false_alarm_rate)

    def metrics(self, model=None) -> dict[str, float]:
        """Held-out accuracy per slice of ``model`` (default: the served model)."""
        with self.lock:
            root = self.root
            return _heldout_accuracy(root.model if model is None else model, root.data_type,
                                     self.buffers.heldout_sets())

    # --- merging -----------------------------------------------------------------------------------------
    def plan_merge(self) -> MergeOutcome | None:
        """Merge the active children into a candidate and gate it; None when there is nothing new.

        Same-size copies of the served weights merge in weight space: the granularity controller
        (daemon/granularity.py) picks method and level on the even rows of each slice's held-out
        buffer. Compact children (another architecture) and children trained from scratch (no
        shared base, so no meaningful task vector) merge by bidirectional distillation on the replay buffers
        (daemon/distill.py): the candidate learns from their ensemble, each learns back from the
        candidate. The gate judges the candidate against the served model on the odd held-out
        rows, so it does not inherit the selection's optimism. Only the snapshot holds the lock:
        merging, distilling and scoring run outside it while ingest continues.
        """
        started = time.perf_counter()
        with self.lock:
            root = self.root
            if self.served_version is None or root is None:
                return None
            active = self.tree.active_children()
            children = [c for c in active if c.in_weight_space_of(root)]
            to_distill = [c for c in active if not c.in_weight_space_of(root)]
            signature = tuple((c.node_id, c.updates) for c in active)
            if not active or signature == self._last_merge_signature:
                return None  # nothing learned since the last attempt: the same merge again
            self._last_merge_signature = signature
            snapshot = {
                # no copy: base_state is only ever replaced (bootstrap, rebase, restore), never written in place
                "base": self.base_state,
                "served": self.served_state(),
                "children": [_cpu_state(c.model) for c in children],
                "weights": [float(max(c.samples, 1)) for c in children],
                "ids": [c.node_id for c in children],
                "distill": {c.node_id: (c.updates, c.architecture, _cpu_state(c.model)) for c in to_distill},
                "replay": self.buffers.replay_rows(),
                "served_version": self.served_version,
                "base_version": self.base_version,
                "heldout": self.buffers.heldout_sets(),
                "arch": root.architecture,
                "data_type": root.data_type,
                "seed": self.counters.batches,
            }
            self.counters.child_updates_since_merge = 0
        select, judge = split_heldout(snapshot["heldout"])
        evaluate = _Evaluator(snapshot["arch"], snapshot["data_type"], self.device)
        plan: dict[str, Any] = {"children": snapshot["ids"], "weights": dict(zip(snapshot["ids"], snapshot["weights"])),
                                "selection_rows": sum(len(y) for _, y in select.values()),
                                "gate_rows": sum(len(y) for _, y in judge.values())}
        state = snapshot["served"]
        if snapshot["children"]:
            state, chosen = self._weight_merge(snapshot, evaluate, select)
            plan.update(chosen)
        distilled: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        if snapshot["distill"]:
            state, distilled, report = self._distill(snapshot, state)
            plan["distill"] = {"children": list(distilled), **report}
        served_metrics = evaluate(snapshot["served"], judge)
        cand_metrics = evaluate(state, judge)
        verdict = gate(served_metrics, cand_metrics, self.s.merge.tolerance)
        gain = _mean(cand_metrics) - _mean(served_metrics)
        accepted, reason = verdict.accepted, verdict.reason
        if accepted and not gain > 0:
            accepted, reason = False, f"no gain: mean held-out accuracy {gain:+.4f} against the served model"
        with self.lock:
            if accepted:
                self.counters.merges_accepted += 1
            else:
                self.counters.merges_rejected += 1
        return MergeOutcome(accepted, reason, state, snapshot["ids"] + list(distilled), snapshot["base_version"],
                            snapshot["served_version"], served_metrics, cand_metrics, plan, verdict,
                            time.perf_counter() - started, distilled)

    def _weight_merge(self, snapshot: dict[str, Any], evaluate: "_Evaluator", select) -> tuple[dict, dict]:
        """Same-size children: the controller's plan, or the best one that passes the gate."""
        result = choose_plan(snapshot["base"], snapshot["children"], snapshot["weights"],
                             lambda state: evaluate(state, select), method=self.s.merge.method,
                             level=self.s.merge.level, group_prefixes=self.s.merge.groups,
                             min_gain=self.s.merge.min_gain, max_evaluations=self.s.merge.max_evaluations)
        fallback = self._admissible_fallback(result, evaluate(snapshot["served"], select))
        chosen = result.plan.label()
        state = result.state
        if fallback is not None:
            state = apply_plan(fallback.plan, snapshot["base"], snapshot["children"], snapshot["weights"])
            log.info("merge: the controller's pick %s regresses a slice on the selection rows; "
                     "taking the best candidate that does not: %s", chosen, fallback.plan.label())
            chosen = fallback.plan.label()
        return state, {**result.to_dict(), "chosen": chosen, "gate_fallback": fallback is not None}

    def _distill(self, snapshot: dict[str, Any], state: dict[str, torch.Tensor]):
        """Children outside the served weight space into the candidate: bidirectional ensemble
        distillation on the replay buffers."""
        candidate = snapshot["arch"].build().to(self.device)
        candidate.load_state_dict(state)
        students = {}
        for node_id, (updates, arch, child_state) in snapshot["distill"].items():
            model = arch.build().to(self.device)
            model.load_state_dict(child_state)
            students[node_id] = (updates, model)
        x, y = snapshot["replay"]
        report = distill_into(candidate, [m for _, m in students.values()], model_input(x, snapshot["data_type"]), y,
                              epochs=self.s.learner.child_epochs, lr=self.s.learner.learning_rate,
                              batch_size=self.s.learner.train_batch_size,
                              generator=torch.Generator().manual_seed(snapshot["seed"]))
        distilled = {node_id: (updates, _cpu_state(m)) for node_id, (updates, m) in students.items()}
        return _cpu_state(candidate), distilled, report.to_dict()

    def _admissible_fallback(self, result, served_on_selection: dict[str, float]):
        """When the controller's pick (best mean) would fail the gate on the selection rows, the
        best-scoring candidate that would pass, if any: a smaller merge that publishes beats a
        larger one that is rejected. None when the pick is fine or nothing passes."""
        def passes(candidate) -> bool:
            return gate(served_on_selection, candidate.per_slice, self.s.merge.tolerance).accepted

        if result.score is None or passes(result.score):
            return None
        admissible = [c for c in result.candidates if passes(c) and _mean(c.per_slice) > _mean(served_on_selection)]
        return max(admissible, key=lambda c: (c.mean, c.worst), default=None)

    def adopt_merge(self, outcome: MergeOutcome, version: int) -> None:
        """The merge was published as ``version``: serve it, and widen the served reference."""
        with self.lock:
            root = self.root
            root.model.load_state_dict(outcome.state)
            for cid, (updates, state) in outcome.distilled_children.items():
                child = self.tree.nodes.get(cid)
                if child is not None and child.updates == updates:  # not retrained meanwhile
                    child.model.load_state_dict(state)
                    child.refresh_fingerprint()
            for cid in outcome.children:
                child = self.tree.nodes[cid]
                self._grow_reference(root, child.reference_x)
                for s in child.slices:
                    if s not in root.slices:
                        root.slices.append(s)
            root.refresh_fingerprint()
            self.served_version = version
            root.updates += 1
            if len(self.tree.active_children()) >= self.s.learner.max_children:
                self._rebase(version)

    def _rebase(self, version: int) -> None:
        """Too many children: the served model becomes the new base and the children retire."""
        for child in self.tree.active_children():
            child.status = "retired"
        self.base_state = self.served_state()
        self.base_version = version
        log.info("rebased on v%d: children retired, their knowledge lives in the served model", version)

    # --- checkpoints -----------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        with self.lock:
            tree_meta, tensors = self.tree.to_checkpoint()
            buf_tensors, buf_meta = self.buffers.to_tensors()
            tensors.update(buf_tensors)
            if self.base_state is not None:
                tensors.update({f"base.{k}": v for k, v in self.base_state.items()})
            tensors["rng"] = self.generator.get_state()
            meta = {
                "tree": tree_meta, "buffers": buf_meta, "counters": asdict(self.counters),
                "served_version": self.served_version, "base_version": self.base_version,
                "bootstrap_batches_seen": self.bootstrap_batches_seen,
                "applied_offsets": dict(self.applied_offsets),
                "recent_batch_ids": list(self.recent_batch_ids),
                "prequential": self.prequential, "kl_threshold": self.thresholds.kl,
            }
            return meta, tensors

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        with self.lock:
            self.tree = ModelTree.from_checkpoint(meta["tree"], tensors, self.device)
            self.buffers.load_tensors(tensors, meta["buffers"])
            base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
            self.base_state = base or None
            self.generator.set_state(tensors["rng"])
            self.counters = Counters(**meta["counters"])
            self.served_version = meta["served_version"]
            self.base_version = meta["base_version"]
            self.bootstrap_batches_seen = meta["bootstrap_batches_seen"]
            self.applied_offsets = dict(meta["applied_offsets"])
            self.recent_batch_ids = deque(meta["recent_batch_ids"], maxlen=self.recent_batch_ids.maxlen)
            self._recent_ids_set = set(self.recent_batch_ids)
            self.prequential = {k: list(v) for k, v in meta["prequential"].items()}
            self.thresholds = Thresholds(kl=meta["kl_threshold"], accuracy=self.thresholds.accuracy)


def split_heldout(sets: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Even rows of each slice choose a merge, odd rows judge it (slices with < 2 rows: choose only)."""
    select = {name: (x[0::2], y[0::2]) for name, (x, y) in sets.items()}
    judge = {name: (x[1::2], y[1::2]) for name, (x, y) in sets.items() if len(y) >= 2}
    return select, judge


def _mean(metrics: dict[str, float]) -> float:
    values = [v for v in metrics.values() if v == v]
    return sum(values) / len(values) if values else float("nan")


class _Evaluator:
    """Held-out accuracy per slice of a state dict, in one reusable model of the served architecture."""

    def __init__(self, arch: Architecture, data_type: str, device: torch.device) -> None:
        self.model = arch.build().to(device)
        self.data_type = data_type

    def __call__(self, state: dict[str, torch.Tensor], sets) -> dict[str, float]:
        self.model.load_state_dict(state)
        return _heldout_accuracy(self.model, self.data_type, sets)


def _heldout_accuracy(model: torch.nn.Module, data_type: str, sets) -> dict[str, float]:
    """Accuracy per slice on ``{slice: (x, y)}``, rounded as metrics and merge records report it."""
    return {name: round(accuracy(model, model_input(x, data_type), y), 4) for name, (x, y) in sets.items()}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
