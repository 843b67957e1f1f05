"""Settings: environment (``FILIAL_*``), a ``.env`` file, then CLI flags, in rising priority.

Settings are grouped: ``kafka``, ``redis``, ``model``, ``learner``, ``merge``, ``publish``,
``checkpoint``, ``ops``, ``cluster`` and ``limits``. Each field has two spellings:

- nested, ``FILIAL_<GROUP>__<FIELD>`` (``FILIAL_LEARNER__KL_THRESHOLD=0.3``);
- flat, the name documented before the groups existed and still the CLI flag
  (``FILIAL_KL_THRESHOLD=0.3``, ``--kl-threshold 0.3``). :data:`FLAT_NAMES` is that table.

Invalid values stop the daemon at start with the field's names and what is allowed
(:func:`load_settings` raises :class:`SettingsError`).

Over 300 lines because every setting of the daemon is declared here, once, with its description: the
CLI flags, the README's table (tested) and the error messages are generated from these fields.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (BaseSettings, DotEnvSettingsSource, PydanticBaseSettingsSource,
                               SettingsConfigDict)

from consumers.wire import WireLimits
from daemon.engine.settings import LearnerSettings, MergeSettings, ModelSettings

_GROUP = ConfigDict(extra="forbid", validate_default=True)


def _readable(path: Path) -> Path:
    """Secrets and certificates are read at start, before any server is started or contacted."""
    try:
        with open(path.expanduser(), "rb"):
            return path
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _bootstrap_servers(value: str | None) -> str | None:
    if value is not None and not all(re.fullmatch(r"\[?[A-Za-z0-9_.:\-]+\]?:\d{1,5}", part.strip())
                                     for part in value.split(",")):
        raise ValueError("must be host:port[,host:port...], e.g. kafka:9092")
    return value


def _redis_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://redis:6379/0")
    return value


ReadableFile = Annotated[Path, AfterValidator(_readable)]


class KafkaSettings(BaseModel):
    model_config = _GROUP

    bootstrap: Annotated[str | None, AfterValidator(_bootstrap_servers)] = Field(None, description="Kafka bootstrap servers host:port[,...]; "
                                  "unset: start the embedded broker")
    topic: str = Field("filial.batches", min_length=1, description="topic the batches arrive on")
    dead_letter_topic: str = Field("filial.dead-letter", min_length=1,
                                   description="where undecodable batches go, with a filial-reason header")
    group_id: str = Field("filial", min_length=1, description="Kafka consumer group")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: ReadableFile | None = Field(None, description="file holding the Kafka SASL password")
    ssl_cafile: ReadableFile | None = None
    ssl_certfile: ReadableFile | None = None
    ssl_keyfile: ReadableFile | None = None
    session_timeout_ms: int = Field(10_000, ge=1000, description="consumer group session timeout")

    @model_validator(mode="after")
    def _sasl(self) -> "KafkaSettings":
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ValueError("kafka_sasl_mechanism needs kafka_security_protocol SASL_PLAINTEXT or SASL_SSL")
        return self


class RedisSettings(BaseModel):
    model_config = _GROUP

    url: Annotated[str | None, AfterValidator(_redis_url)] = Field(None, description="redis:// or rediss:// URL; unset: start the embedded server")
    username: str | None = None
    password: SecretStr | None = None
    password_file: ReadableFile | None = Field(None, description="file holding the Redis password")
    ssl_cafile: ReadableFile | None = Field(None, description="CA bundle for rediss://")
    ssl_certfile: ReadableFile | None = Field(None, description="client certificate for rediss:// (mutual TLS)")
    ssl_keyfile: ReadableFile | None = Field(None, description="client key for rediss:// (mutual TLS)")
    prefix: str = Field("filial", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
                        description="prefix of every Redis key")


class MergeJobSettings(MergeSettings):
    """The engine's merge settings plus the merge job's clock."""
    trigger: Literal["clock", "count"] = Field(
        "clock", description="clock: the merge job runs on interval_seconds or cron, and is nudged after "
                             "after_child_updates updates; count: only after after_child_updates updates, in the "
                             "consume loop, waiting for its publish (reproducible: same stream and seed, same versions)")
    interval_seconds: float = Field(60.0, gt=0, description="interval trigger of the merge job")
    cron: str | None = Field(None, description="crontab trigger, e.g. '*/10 * * * *'")
    cpu_share: float = Field(0.10, gt=0, le=1, description="clock trigger: the merge job's most share of the "
                             "daemon's CPU. After a merge that used c CPU-seconds it rests c*(1/cpu_share - 1) "
                             "seconds (nudges and ticks meanwhile wait for the next one after), unless ingest has "
                             "been idle for 2 s (nothing to protect: a tick then merges); 1: never rests. "
                             "merge_now() and the count trigger are not limited")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a crontab expression ({exc})") from None
        return value


class PublishSettings(BaseModel):
    model_config = _GROUP

    line: str = Field("main", pattern=r"^[A-Za-z0-9_.\-]+$", description="model line the served model publishes to")
    keep_versions: int = Field(10, ge=1, description="versions kept per line; older are deleted")
    zoo: bool = Field(True, description="publish every child as a zoo member on its own line {line}.{child_id}, "
                      "with its fingerprint, for `filial serve` (README, \"The zoo\")")
    zoo_max_members: int = Field(32, ge=1, description="zoo members kept; the least recently published leave first")
    zoo_max_bytes: int = Field(256 * 2**20, ge=1, description="Redis bytes the zoo's members may hold (weights, "
                               "manifests, fingerprints of every kept version); the oldest leave first")
    zoo_keep_versions: int = Field(2, ge=1, description="versions kept per member line")
    signing_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for manifests")
    signing_key_file: ReadableFile | None = Field(None, description="file holding the manifest HMAC key")
    block_seconds: float = Field(2.0, ge=0, description="longest a publish may hold up ingest; "
                                 "after it the publish goes on retrying in the background")
    drain_seconds: float = Field(30.0, ge=0, description="on stop, how long queued publishes may "
                                 "still retry before they are abandoned (redone after restart)")


class CheckpointSettings(BaseModel):
    model_config = _GROUP

    every_batches: int = Field(20, ge=1, description="checkpoint (and commit offsets) after this many batches")
    every_seconds: float = Field(30.0, gt=0, description="... or after this many seconds with changes")


class OpsSettings(BaseModel):
    model_config = _GROUP

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    health_host: str = Field("0.0.0.0", description="address of the /healthz /readyz /metrics server")
    health_port: int = Field(8080, ge=-1, le=65535, description="port of /healthz /readyz /metrics; "
                             "0: any free port; -1: no server")
    health_stall_seconds: float = Field(300.0, gt=0, description="/healthz fails when the consume loop has "
                                        "not ticked, or has held one message, for this long")
    crash_loop_after: int = Field(2, ge=1, description="a batch in flight at this many consecutive crashes of "
                                  "the process is dead-lettered as crash_loop instead of being applied again")
    health_probe_seconds: float = Field(1.0, gt=0, description="how often Redis and the broker are probed")
    backoff_max_seconds: float = Field(30.0, gt=0, description="cap of the exponential backoff when "
                                       "reconnecting and retrying publishes and checkpoints")


class ClusterSettings(BaseModel):
    model_config = _GROUP

    learner_id: str = Field("", pattern=r"^[A-Za-z0-9_\-]*$", description="this learner's name among several in one "
                            "consumer group (e.g. the pod name): its checkpoint is its own ({p}:learner:{id}:...) and its "
                            "children publish as {line}.{id}-{child}; empty: a single learner")
    lease_ttl_seconds: float = Field(15.0, gt=0, description="the merge leader's lease: held this long unless renewed "
                                     "(every third of it); only the holder merges and publishes the served line, "
                                     "fenced by its token (zoo_store/lease.py)")


GROUPS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSettings, "redis": RedisSettings, "model": ModelSettings, "learner": LearnerSettings,
    "merge": MergeJobSettings, "publish": PublishSettings, "checkpoint": CheckpointSettings, "ops": OpsSettings,
    "cluster": ClusterSettings,
}

# The flat name of each field where it is not "<group>_<field>" nor the bare field name.
_FLAT_EXCEPTIONS = {
    ("kafka", "topic"): "topic", ("kafka", "dead_letter_topic"): "dead_letter_topic",
    ("kafka", "group_id"): "group_id", ("redis", "ssl_cafile"): "redis_ssl_ca_file",
    ("model", "num_classes"): "num_classes", ("model", "device"): "device", ("model", "precision"): "precision",
    ("publish", "line"): "line", ("publish", "keep_versions"): "keep_versions",
    ("publish", "signing_key"): "signing_key", ("publish", "signing_key_file"): "signing_key_file",
}
_BARE_GROUPS = {"learner", "ops", "cluster"}  # their fields were documented without a prefix


def _flat_names() -> dict[str, tuple[str, str]]:
    table = {}
    for group, model in GROUPS.items():
        for field in model.model_fields:
            flat = _FLAT_EXCEPTIONS.get((group, field)) or (field if group in _BARE_GROUPS else f"{group}_{field}")
            table[flat] = (group, field)
    return table


FLAT_NAMES: dict[str, tuple[str, str]] = _flat_names()
"""flat name (CLI flag ``--flat-name``, ``FILIAL_FLAT_NAME``) -> (group, field)."""
_NESTED_TO_FLAT = {nested: flat for flat, nested in FLAT_NAMES.items()}


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat names (``kl_threshold``) into their groups; group names and ``limits`` pass through."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key in FLAT_NAMES:
            group, field = FLAT_NAMES[key]
            nested.setdefault(group, {})
            if isinstance(nested[group], dict):
                nested[group][field] = value
        elif isinstance(value, dict) and isinstance(nested.get(key), dict):
            nested[key] = {**value, **nested[key]}
        else:
            nested[key] = value
    return nested


class _FlatVariables(PydanticBaseSettingsSource):
    """``FILIAL_<FLAT_NAME>`` variables (environment or .env) as nested values."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str | None]) -> None:
        super().__init__(settings_cls)
        self.variables = {k.upper(): v for k, v in variables.items() if v is not None}

    def get_field_value(self, field, field_name):  # whole groups are returned by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return nest({flat: self.variables[f"FILIAL_{flat.upper()}"] for flat in FLAT_NAMES
                     if f"FILIAL_{flat.upper()}" in self.variables})


class _NestedDotEnv(DotEnvSettingsSource):
    """The .env file's nested names; its flat names are read by :class:`_FlatVariables`."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.flat = {k: v for k, v in self.env_vars.items() if k.upper().removeprefix("FILIAL_") in
                     {f.upper() for f in FLAT_NAMES}}
        # a .env shared with `filial serve` (FILIAL_SERVE__*) or other programs: not the daemon's to refuse
        self.env_vars = {k: v for k, v in self.env_vars.items() if k not in self.flat
                         and k.upper().startswith("FILIAL_") and not k.upper().startswith(SERVE_PREFIX)}


class SettingsError(ValueError):
    """Raised with one line per invalid field: ``field (--flag, FILIAL_NAME): problem (got ...)``."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FILIAL_", env_file=".env", env_file_encoding="utf-8",
                                      env_nested_delimiter="__", extra="forbid", validate_default=True)

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    merge: MergeJobSettings = Field(default_factory=MergeJobSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    limits: WireLimits = Field(default_factory=WireLimits, description="input size limits")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        dotenv = _NestedDotEnv(settings_cls)
        return (init_settings, env_settings, _FlatVariables(settings_cls, os.environ), dotenv,
                _FlatVariables(settings_cls, dotenv.flat), file_secret_settings)

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.learner.spawn_method == "copy" and self.learner.child_size_ratio < 1:
            raise ValueError("spawn_method 'copy' needs child_size_ratio 1: a compact child cannot copy the "
                             "served weights (use auto or hkt)")
        if self.limits.num_classes != self.model.num_classes:
            self.limits = self.limits.model_copy(update={"num_classes": self.model.num_classes})
        return self

    def with_servers(self, kafka_bootstrap: str | None = None, redis_url: str | None = None) -> "Settings":
        """A copy with these server addresses filled in (embedded servers, tests)."""
        kafka = self.kafka.model_copy(update={"bootstrap": kafka_bootstrap or self.kafka.bootstrap})
        redis = self.redis.model_copy(update={"url": redis_url or self.redis.url})
        return self.model_copy(update={"kafka": kafka, "redis": redis})

    def public_dict(self) -> dict[str, Any]:
        """Settings as logged at start: secrets masked."""
        return self.model_dump(mode="json")


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "settings"
        flat = _NESTED_TO_FLAT.get(tuple(loc[:2])) if len(loc) >= 2 else None
        if flat is not None:
            field += f" (--{flat.replace('_', '-')}, FILIAL_{flat.upper()})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg} (got {err.get('input')!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)


# FILIAL_ variables that are not settings: make chaos's failpoints, the image's build argument
_NOT_SETTINGS = ("FILIAL_CHAOS_TRACE", "FILIAL_CHAOS_CRASH_SLICE", "FILIAL_CHAOS_PAUSE", "FILIAL_EXTRAS")
SERVE_PREFIX = "FILIAL_SERVE__"  # `filial serve`'s settings (daemon/serve/settings.py), which checks its own


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``FILIAL_*`` variable that no setting reads (a misspelling is otherwise silently
    ignored), naming the nearest valid name."""
    import difflib

    known = {f"FILIAL_{flat.upper()}" for flat in FLAT_NAMES} | set(_NOT_SETTINGS)
    for group, model in {**GROUPS, "limits": WireLimits}.items():
        known.add(f"FILIAL_{group.upper()}")
        known |= {f"FILIAL_{group.upper()}__{field.upper()}" for field in model.model_fields}
    warnings = []
    for name in sorted(environ):
        if name.upper().startswith("FILIAL_") and name.upper() not in known and not name.upper().startswith(SERVE_PREFIX):
            near = difflib.get_close_matches(name.upper().removeprefix("FILIAL_"),  # the shared prefix is no evidence
                                             sorted(k.removeprefix("FILIAL_") for k in known), n=1, cutoff=0.6)
            hint = f"; did you mean FILIAL_{near[0]}?" if near else "; 'filial run --help' lists the settings"
            warnings.append(f"{name} is not a filial setting and is ignored{hint}")
    return warnings


def load_settings(**overrides: Any) -> Settings:
    """Settings from env/.env plus ``overrides`` (CLI flags: flat names or groups); raise
    SettingsError naming the fields."""
    try:
        return Settings(**nest({k: v for k, v in overrides.items() if v is not None}))
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
