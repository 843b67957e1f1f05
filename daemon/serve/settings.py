"""``filial serve``'s settings: environment (``FILIAL_SERVE__<FIELD>``), a ``.env`` file, then CLI flags
(``--field-name``, generated from the fields by :func:`add_settings_flags`), in rising priority.

The same mechanism as ``filial run``'s (daemon/service/settings.py and flags.py): pydantic-settings
fields with descriptions, one flag per field, and invalid values stopping the process at start with
one line per field naming the flag and the variable (:class:`SettingsError`). The server is its own
process with its own environment, so its settings form one group of flat fields under one prefix;
none is shared with the daemon's (this layer does not import the service).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FILIAL_SERVE__"
MODES = ("served", "route", "blend", "layerwise")


def _readable(path: Path | None) -> Path | None:
    """Secrets and certificates are read at start, before Redis is contacted."""
    if path is not None:
        try:
            with open(path.expanduser(), "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://redis:6379/0")
    return value


ReadableFile = Annotated[Path | None, AfterValidator(_readable)]
_NAME = r"^[A-Za-z0-9_.\-]+$"


class ServeSettings(BaseSettings):
    # extra="ignore": a .env shared with the daemon holds its FILIAL_* names too; misspelt
    # FILIAL_SERVE__ names are warned about at start instead (unknown_variables)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", validate_default=True)

    redis_url: Annotated[str, AfterValidator(_redis_url)] = Field(
        description="Redis the daemon publishes to (redis:// or rediss://), required")
    redis_username: str | None = Field(None, description="Redis ACL user")
    redis_password: SecretStr | None = Field(None, description="Redis password")
    redis_password_file: ReadableFile = Field(None, description="file holding the Redis password")
    redis_ssl_cafile: ReadableFile = Field(None, description="CA bundle for rediss://")
    redis_ssl_certfile: ReadableFile = Field(None, description="client certificate for rediss:// (mutual TLS)")
    redis_ssl_keyfile: ReadableFile = Field(None, description="client key for rediss:// (mutual TLS)")
    prefix: str = Field("filial", min_length=1, pattern=_NAME, description="the daemon's Redis key prefix")
    line: str = Field("main", pattern=_NAME, description="the served model line; its members are {line}.{child}")
    signing_key: SecretStr | None = Field(None, description="HMAC key the manifests are signed with: "
                                          "unsigned or mis-signed versions are refused")
    signing_key_file: ReadableFile = Field(None, description="file holding the manifest HMAC key")
    mode: Literal["served", "route", "blend", "layerwise"] = Field(
        "served", description="default mode of a request that names none: served (the served model), route "
                              "(the nearest member per row), blend (members weighted per row), layerwise "
                              "(members merged in weight space per layer group)")
    temperature: float = Field(0.05, gt=0, description="softmax temperature of blend and layerwise weights "
                               "(lower: sharper)")
    pin_version: int | None = Field(None, ge=1, description="serve this served version only, ignoring newer ones")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="where the models run: cpu, cuda, cuda:N")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute precision of the model calls, as the daemon's: auto is bf16 autocast on CUDA, "
        "float32 on the CPU; bfloat16 autocasts on the CPU too")
    host: str = Field("0.0.0.0", description="address the HTTP server listens on")
    port: int = Field(8080, ge=0, le=65535, description="port of /predict /healthz /readyz /metrics (0: any free)")
    max_batch_rows: int = Field(256, ge=1, description="micro-batching: rows of concurrent requests run "
                                "in one model call, at most")
    max_wait_ms: float = Field(0.0, ge=0, description="micro-batching: how long the first request of a model "
                               "call waits for others to join it (0: not at all; requests that arrive while a call "
                               "runs still share the next one)")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="larger request bodies are refused (413)")
    max_request_rows: int = Field(1024, ge=1, description="rows one request may hold (413 beyond)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    def secret(self, name: str) -> str | None:
        """``redis_password`` / ``signing_key`` from its setting, else from its ``*_file`` setting."""
        value, file = getattr(self, name), getattr(self, f"{name}_file")
        if value is not None:
            return value.get_secret_value()
        return Path(file).expanduser().read_text().strip() if file is not None else None

    def public_dict(self) -> dict[str, Any]:
        """Settings as logged at start: secrets masked."""
        return self.model_dump(mode="json")


class SettingsError(ValueError):
    """One line per invalid field: ``field (--flag, FILIAL_SERVE__FIELD): problem (got ...)``."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "settings"
        where = f" ({_flag(field)}, {ENV_PREFIX}{field.upper()})" if field in ServeSettings.model_fields else ""
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        lines.append(f"{field}{where}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> ServeSettings:
    """Settings from the environment and .env plus ``overrides`` (flags); SettingsError names the fields."""
    try:
        return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` per setting (a new field is a new flag with no other edit)."""
    group = parser.add_argument_group(f"settings (each also {ENV_PREFIX}<FIELD> in the environment or .env)")
    for name, field in ServeSettings.model_fields.items():
        default = "unset" if field.default is None else field.default
        default = "required" if field.is_required() else default
        metavar = "N" if name == "pin_version" else "VALUE"
        group.add_argument(_flag(name), dest=name, default=None, metavar=metavar,
                           help=f"{field.description or ''} [default: {default}]".strip())


def settings_from_flags(args: argparse.Namespace) -> ServeSettings:
    return load_settings(**{k: v for k, v in vars(args).items() if k in ServeSettings.model_fields})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning per ``FILIAL_SERVE__*`` variable no setting reads, naming the nearest valid one."""
    known = [name.upper() for name in ServeSettings.model_fields]
    warnings = []
    for name in sorted(environ):
        field = name.upper().removeprefix(ENV_PREFIX)
        if name.upper().startswith(ENV_PREFIX) and field not in known:
            near = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
            hint = f"; did you mean {ENV_PREFIX}{near[0]}?" if near else "; 'filial serve --help' lists them"
            warnings.append(f"{name} is not a setting of filial serve and is ignored{hint}")
    return warnings
