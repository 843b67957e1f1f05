"""Kafka client options (bootstrap, TLS, SASL) shared by the consumer and the producers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr


class KafkaConnection(BaseModel):
    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap.split(","),
                                  "security_protocol": self.security_protocol,
                                  "reconnect_backoff_ms": 100, "reconnect_backoff_max_ms": 10_000}
        if self.sasl_mechanism:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password.get_secret_value() if self.sasl_password else None)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = str(value)
        return kwargs
