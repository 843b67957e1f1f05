"""The settings the engine reads: the served model, the learner and the merge.

They live here, not in the service, because the engine is built from them and imports nothing
above it; the service's :class:`daemon.service.settings.Settings` nests them as the groups
``model``, ``learner`` and ``merge`` (environment ``FILIAL_LEARNER__KL_THRESHOLD``, or the flat
``FILIAL_KL_THRESHOLD`` documented before the groups existed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    num_classes: int = Field(10, ge=2, le=100_000, description="labels are 0..num_classes-1")
    family: Literal["image_cnn", "sequence_gru", "tabular_mlp"] | None = Field(
        None, description="unset: chosen from the first batch's data_type")
    factory: str | None = Field(None, description="user model 'package.module:factory' (see README)")
    width: int | None = Field(None, ge=1, description="width of the served model (family default if unset)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute precision of training and evaluation: auto is bf16 autocast on CUDA, float32 "
        "on the CPU; bfloat16 autocasts on the CPU too (faster where the CPU has AVX512-BF16 or AMX, measured in "
        "the README's 'Throughput'); weights, checkpoints and versions stay float32")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"{value!r} is not a device (allowed: auto, cpu, cuda, cuda:N)")
        return value


class LearnerSettings(BaseModel):
    """Drift, decisions, bootstrap, child training and the per-slice buffers."""
    model_config = ConfigDict(extra="forbid", validate_default=True)

    seed: int = Field(0, ge=0, description="seeds model initialisation, held-out splits and replay sampling: "
                      "the same stream and seed give bit-identical versions on the CPU with merge_trigger count")
    kl_threshold: float = Field(0.5, gt=0, description="drift when KL(batch || reference) >= this")
    kl_false_alarm_rate: float | None = Field(None, gt=0, lt=0.5, description="set to calibrate "
                                              "kl_threshold on the reference at this false-alarm rate")
    concept_drift_alpha: float = Field(1e-5, gt=0, lt=0.5, description="concept drift (labels changed where "
                                       "feature KL sees nothing): a batch accuracy this improbable given the served "
                                       "model's prequential accuracy so far (exact binomial tail; daemon/learn/drift.py)")
    accuracy_threshold: float = Field(0.70, gt=0, le=1, description="served model must reach this accuracy")
    bootstrap_batches: int = Field(8, ge=1, description="batches that train the first served model; it is "
                                   "published after them (or after bootstrap_rows rows, whichever comes first) once "
                                   "its held-out accuracy reaches bootstrap_accuracy, after twice as many at the "
                                   "latest, or as soon as a batch of another slice arrives")
    bootstrap_rows: int = Field(400, ge=1, description="rows after which the first served model is published "
                                "even before bootstrap_batches batches (large batches: a first version as soon as "
                                "there are rows enough to learn from), on the same terms")
    bootstrap_epochs: int = Field(5, ge=1, description="epochs per bootstrap batch, each of at least 640 "
                                  "rows (a small batch's rows repeated: a new model needs the optimizer steps)")
    bootstrap_accuracy: float = Field(0.8, gt=0, le=1, description="held-out accuracy the first served model "
                                      "must reach (bootstrap stops trying after 2x bootstrap_batches or 2x bootstrap_rows)")
    child_epochs: int = Field(2, ge=1, description="epochs per child update (seed: 2)")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate (seed: 1e-3)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy targets smoothed by this share "
                                   "(Szegedy et al. 2016) in every cross-entropy fit: the served model, children, "
                                   "bootstrap and merge consolidation (measured in the README's 'Learning quality'); "
                                   "0: plain cross-entropy")
    train_batch_size: int = Field(64, ge=1, description="rows per optimizer step")
    heldout_fraction: float = Field(0.2, ge=0.05, lt=1, description="share of each batch kept for evaluation")
    replay_per_slice: int = Field(1000, ge=0, description="replay buffer size per slice (reservoir)")
    heldout_per_slice: int = Field(500, ge=10, description="held-out buffer size per slice")
    replay_ratio: float = Field(1.0, ge=0, description="replayed samples per new sample in an update, drawn "
                                "equally from every other slice (experience-balanced replay)")
    train_served: bool = Field(True, description="the served model keeps learning from every applied batch "
                               "(new rows plus replay); its progress reaches followers through the merge job "
                               "and the gate. false: only children learn (the seed's behaviour)")
    min_spawn_rows: int = Field(32, ge=1, description="a batch with fewer rows never spawns a child (KL on tiny "
                                "batches is noisy): it is evaluated and, with train_served, learned by the served model")
    supersede: bool = Field(True, description="a slice whose batches relabel an older slice's inputs (or its own "
                            "past), two batches in a row, supersedes it: the older slice's buffers and bookkeeping "
                            "are dropped so the new labels can be served (README 'How the daemon decides'). "
                            "false: the older labels stay guarded and rehearsed")
    reference_size: int = Field(512, ge=32, description="samples in each model's reference fingerprint")
    max_children: int = Field(32, ge=1, description="cap on active children, enforced at spawn: when full, a "
                              "batch that would spawn retrains the nearest child instead (nothing learned is "
                              "discarded; the decision's reason says so). An accepted merge that leaves this many "
                              "active retires them all: their knowledge is in the served model, its new base")
    max_slices: int = Field(64, ge=2, description="cap on distinct slice names held (each costs replay and "
                            "held-out buffers and metric labels): a batch of a new slice beyond it evicts the "
                            "least recently seen slice's buffers, accuracy bookkeeping and labels (logged); "
                            "what the models learned from it stays in their weights")
    child_size_ratio: float = Field(1.0, gt=0, le=1, description="width of a child relative to the served model; "
                                    "< 1: compact children, trained by hereditary knowledge transfer, published "
                                    "on their own model lines and merged into the served model by distillation")
    spawn_method: Literal["auto", "hkt", "copy", "scratch"] = Field(
        "auto", description="how a child inherits: auto (the measured table in the README) | hkt | copy | scratch")
    child_tuning: Literal["none", "fisher", "bernoulli"] = Field(
        "none", description="Child-Tuning gradient masks for same-size children: fisher (task-driven) | "
                            "bernoulli (task-free)")
    child_tuning_p: float = Field(0.3, gt=0, le=1, description="share of weights Child-Tuning updates")


class MergeSettings(BaseModel):
    """How children are merged into the served model and when a merge is due by count. The service
    extends this group with the merge job's clock (interval, cron)."""
    model_config = ConfigDict(extra="forbid", validate_default=True)

    method: str = Field("auto", description="auto (the granularity controller searches every method) | "
                        "average | task_arithmetic | ties | magmax (pinned)")
    level: Literal["auto", "model", "group", "layer"] = Field(
        "auto", description="auto (the controller picks up to layer) | model | group | layer (pinned)")
    groups: dict[str, list[str]] | None = Field(
        None, description="layer groups by parameter-name prefix, JSON, e.g. "
                          "'{\"features\": [\"stages.\"], \"head\": [\"head.\"]}' (default: these two)")
    max_evaluations: int = Field(100, ge=1, description="cap on candidate merges the controller scores")
    min_gain: float = Field(0.02, ge=0, le=1, description="mean held-out gain a finer or other candidate "
                            "needs to replace the incumbent (guards against selecting noise)")
    tolerance: float = Field(0.05, ge=0, le=1, description="max held-out accuracy drop on any slice, beyond the "
                             "one-sided (1 - guard_alpha) bound of its drop (daemon/learn/merging/gate.py)")
    alpha: float = Field(0.05, gt=0, lt=1, description="a merge publishes only when its overall gain on the held-out "
                         "rows is significant at this level (paired test on per-row correctness; 0.5: any gain)")
    confirm_alpha: float = Field(0.05, ge=0, lt=1, description="a candidate rejected only because its gain is not yet "
                                 "significant is held and judged again on each later batch's rows before they train, "
                                 "at confirm_alpha/2, /4, ... (at most confirm_alpha in all; "
                                 "daemon/learn/merging/confirm.py); 0: off")
    guard_alpha: float = Field(0.10, gt=0, lt=1, description="confidence of the per-slice guard's drop bound")
    recency_half_life: float = Field(48, ge=0, description="the gate's overall gain weighs each slice by "
                                     "2^-(batches since it was last seen / this); 0: every slice the same")
    consolidate_epochs: int = Field(48, ge=0, description="most epochs the merge candidate trains on slice-balanced "
                                    "replay before the gate (rehearsal consolidation: every slice seen weighs the "
                                    "same, as in GDumb); a bound on the cost, not the usual stop: consolidate_patience "
                                    "stops it (small buffers are few optimizer steps an epoch and need more of them; "
                                    "README 'Learning quality'); 0: off")
    consolidate_patience: int = Field(4, ge=0, description="stop consolidating once the selection rows' mean "
                                      "cross-entropy has not fallen for this many epochs, keeping the best (0: always "
                                      "run every epoch). The selection rows are few (half of each slice's held-out "
                                      "rows): their accuracy, the measure until session 22, moved by whole rows and "
                                      "stopped too early (README 'Learning quality')")
    consolidate_congruence: float = Field(0.0, ge=0, description="weight of positive-congruent consolidation: the "
                                          "candidate also learns the published version's predictions on the rows "
                                          "that version gets right (focal distillation, Yan et al. 2021), so fewer "
                                          "rows followers got right are lost; better final accuracy, slower "
                                          "serving of new slices (README 'Learning quality'); 0: off")
    consolidate_rows_per_slice: int = Field(500, ge=1, description="rows of each slice's replay buffer per "
                                            "consolidation epoch (fewer are repeated, more are subsampled)")
    consolidate_max_rows: int = Field(10_000, ge=1, description="cap on the rows of one consolidation epoch: "
                                      "with many slices each gives max_rows / slices, so a merge's cost stays bounded")
    after_child_updates: int = Field(8, ge=1, description="merge after this many updates (batches that trained a "
                                     "child or the served model) since the last merge")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from daemon.learn.merging.methods import METHODS

        if value != "auto" and value not in METHODS:
            raise ValueError(f"unknown merge method {value!r} (allowed: auto, {', '.join(sorted(METHODS))})")
        return value

    @field_validator("groups", mode="before")
    @classmethod
    def _groups_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):  # a CLI flag or a flat environment variable
            import json

            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg}); e.g. '{{\"features\": [\"stages.\"]}}'") from None
        return value
