"""Settings: environment (``FILIAL_*``), a ``.env`` file, then CLI flags, in rising priority.

Every field is a flag of ``filial run`` (``--kl-threshold 0.3``) and an environment variable
(``FILIAL_KL_THRESHOLD=0.3``). Invalid values stop the daemon at start with the field's name and
what is allowed (:func:`load_settings` raises :class:`SettingsError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumers.wire import WireLimits


class SettingsError(ValueError):
    """Raised with one line per invalid field: ``field: problem (allowed: ...)``."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FILIAL_", env_file=".env", env_file_encoding="utf-8", env_nested_delimiter="__",
                                      extra="forbid", validate_default=True)

    # --- connections -------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(None, description="Kafka bootstrap servers host:port[,...]; "
                                        "unset: start the embedded broker")
    topic: str = Field("filial.batches", min_length=1, description="topic the batches arrive on")
    dead_letter_topic: str = Field("filial.dead-letter", min_length=1,
                                   description="where undecodable batches go, with a filial-reason header")
    group_id: str = Field("filial", min_length=1, description="Kafka consumer group")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_session_timeout_ms: int = Field(10_000, ge=1000, description="consumer group session timeout")
    redis_url: str | None = Field(None, description="redis:// or rediss:// URL; unset: start the embedded server")
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ssl_ca_file: Path | None = None
    redis_prefix: str = Field("filial", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
                              description="prefix of every Redis key")
    line: str = Field("main", pattern=r"^[A-Za-z0-9_.\-]+$", description="model line the served model publishes to")

    # --- model ----------------------------------------------------------------------------------
    num_classes: int = Field(10, ge=2, le=100_000, description="labels are 0..num_classes-1")
    model_family: Literal["image_cnn", "sequence_gru", "tabular_mlp"] | None = Field(
        None, description="unset: chosen from the first batch's data_type")
    model_factory: str | None = Field(None, description="user model 'package.module:factory' (see README)")
    model_width: int | None = Field(None, ge=1, description="width of the served model (family default if unset)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    # --- drift and decisions ------------------------------------------------------------------
    kl_threshold: float = Field(0.5, gt=0, description="drift when KL(batch || reference) >= this")
    kl_false_alarm_rate: float | None = Field(None, gt=0, lt=0.5, description="set to calibrate "
                                              "kl_threshold on the reference at this false-alarm rate")
    accuracy_threshold: float = Field(0.70, gt=0, le=1, description="served model must reach this accuracy")
    bootstrap_batches: int = Field(8, ge=1, description="batches that train the first served model")
    bootstrap_epochs: int = Field(5, ge=1, description="epochs per bootstrap batch")
    bootstrap_accuracy: float = Field(0.8, gt=0, le=1, description="held-out accuracy the first served model "
                                      "must reach (bootstrap stops trying after 4x bootstrap_batches)")
    child_epochs: int = Field(2, ge=1, description="epochs per child update (seed: 2)")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate (seed: 1e-3)")
    train_batch_size: int = Field(64, ge=1)
    heldout_fraction: float = Field(0.2, ge=0.05, lt=1, description="share of each batch kept for evaluation")
    replay_per_slice: int = Field(1000, ge=0, description="replay buffer size per slice (reservoir)")
    heldout_per_slice: int = Field(500, ge=10, description="held-out buffer size per slice")
    replay_ratio: float = Field(1.0, ge=0, description="replayed samples per new sample in a child update")
    reference_size: int = Field(512, ge=32, description="samples in each model's reference fingerprint")
    max_children: int = Field(32, ge=1, description="cap on active children (oldest merged one is retired)")
    child_size_ratio: float = Field(1.0, gt=0, le=1, description="width of a child relative to the served model; "
                                    "< 1: compact children, trained by hereditary knowledge transfer, published "
                                    "on their own model lines and merged into the served model by distillation")
    spawn_method: Literal["auto", "hkt", "copy", "scratch"] = Field(
        "auto", description="how a child inherits: auto (the measured table in the README) | hkt | copy | scratch")
    child_tuning: Literal["none", "fisher", "bernoulli"] = Field(
        "none", description="Child-Tuning gradient masks for same-size children: fisher (task-driven) | "
                            "bernoulli (task-free)")
    child_tuning_p: float = Field(0.3, gt=0, le=1, description="share of weights Child-Tuning updates")

    # --- merging -----------------------------------------------------------------------------------
    merge_method: str = Field("auto", description="auto (the granularity controller searches every method) | "
                              "average | task_arithmetic | ties | magmax (pinned)")
    merge_level: Literal["auto", "model", "group", "layer"] = Field(
        "auto", description="auto (the controller picks up to layer) | model | group | layer (pinned)")
    merge_groups: dict[str, list[str]] | None = Field(
        None, description="layer groups by parameter-name prefix, JSON, e.g. "
                          "'{\"features\": [\"stages.\"], \"head\": [\"head.\"]}' (default: these two)")
    merge_max_evaluations: int = Field(100, ge=1, description="cap on candidate merges the controller scores")
    merge_min_gain: float = Field(0.02, ge=0, le=1, description="mean held-out gain a finer or other candidate "
                                  "needs to replace the incumbent (guards against selecting noise)")
    merge_tolerance: float = Field(0.02, ge=0, le=1, description="max held-out accuracy drop on any slice")
    merge_interval_seconds: float = Field(60.0, gt=0, description="interval trigger of the merge job")
    merge_cron: str | None = Field(None, description="crontab trigger, e.g. '*/10 * * * *'")
    merge_after_child_updates: int = Field(8, ge=1, description="also merge after this many child updates")

    # --- publishing and durability ----------------------------------------------------------------------
    keep_versions: int = Field(10, ge=1, description="versions kept per line; older are deleted")
    signing_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for manifests")
    checkpoint_every_batches: int = Field(20, ge=1)
    checkpoint_every_seconds: float = Field(30.0, gt=0)
    publish_block_seconds: float = Field(2.0, ge=0, description="longest a publish may hold up ingest; "
                                         "after it the publish goes on retrying in the background")
    publish_drain_seconds: float = Field(30.0, ge=0, description="on stop, how long queued publishes may "
                                         "still retry before they are abandoned (redone after restart)")

    # --- operations ---------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    limits: WireLimits = Field(default_factory=WireLimits, description="input size limits")
    health_host: str = Field("0.0.0.0", description="address of the /healthz /readyz /metrics server")
    health_port: int = Field(8080, ge=-1, le=65535, description="port of /healthz /readyz /metrics; "
                             "0: any free port; -1: no server")
    health_stall_seconds: float = Field(300.0, gt=0, description="/healthz fails when the consume loop has "
                                        "not ticked for this long")
    health_probe_seconds: float = Field(1.0, gt=0, description="how often Redis and the broker are probed")
    backoff_max_seconds: float = Field(30.0, gt=0, description="cap of the exponential backoff when "
                                       "reconnecting and retrying publishes and checkpoints")
    # secrets files (Docker/Kubernetes secrets): read at start, used when the plain field is unset
    kafka_sasl_password_file: Path | None = Field(None, description="file holding the Kafka SASL password")
    redis_password_file: Path | None = Field(None, description="file holding the Redis password")
    signing_key_file: Path | None = Field(None, description="file holding the manifest HMAC key")
    redis_ssl_certfile: Path | None = Field(None, description="client certificate for rediss:// (mutual TLS)")
    redis_ssl_keyfile: Path | None = Field(None, description="client key for rediss:// (mutual TLS)")

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from daemon.merge import METHODS

        if value != "auto" and value not in METHODS:
            raise ValueError(f"unknown merge method {value!r} (allowed: auto, {', '.join(sorted(METHODS))})")
        return value

    @field_validator("merge_groups", mode="before")
    @classmethod
    def _groups_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):  # a CLI flag; the environment is JSON-decoded by pydantic-settings
            import json

            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg}); e.g. '{{\"features\": [\"stages.\"]}}'") from None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"{value!r} is not a device (allowed: auto, cpu, cuda, cuda:N)")
        return value

    @field_validator("merge_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a crontab expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.kafka_sasl_mechanism and not self.kafka_security_protocol.startswith("SASL"):
            raise ValueError("kafka_sasl_mechanism needs kafka_security_protocol SASL_PLAINTEXT or SASL_SSL")
        if self.spawn_method == "copy" and self.child_size_ratio < 1:
            raise ValueError("spawn_method 'copy' needs child_size_ratio 1: a compact child cannot copy the "
                             "served weights (use auto or hkt)")
        if self.limits.num_classes != self.num_classes:
            self.limits = self.limits.model_copy(update={"num_classes": self.num_classes})
        return self

    def public_dict(self) -> dict[str, Any]:
        """Settings as logged at start: secrets masked."""
        return self.model_dump(mode="json")


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg} (got {err.get('input')!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env/.env plus ``overrides`` (CLI flags); raise SettingsError naming fields."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
