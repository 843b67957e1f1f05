"""``filial run``'s flags, generated from the settings: one ``--flat-name`` per field (the
:data:`~daemon.service.settings.FLAT_NAMES` table), grouped as the settings are, plus the input
limits; and the parsed flags back into :func:`~daemon.service.settings.load_settings`.

Beside the settings so that a new field is a new flag with no other edit.
"""

from __future__ import annotations

import argparse
from typing import Any

from consumers.wire import WireLimits
from daemon.service.settings import FLAT_NAMES, GROUPS, Settings, load_settings


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for group_name, model in GROUPS.items():
        group = parser.add_argument_group(f"{group_name} settings (each also FILIAL_<FLAG> or "
                                          f"FILIAL_{group_name.upper()}__<FIELD> in the environment or .env)")
        for flat, (owner, name) in FLAT_NAMES.items():
            if owner != group_name:
                continue
            field = model.model_fields[name]
            default = "unset" if field.default is None else field.default
            group.add_argument(f"--{flat.replace('_', '-')}", dest=flat, default=None, metavar="VALUE",
                               help=f"{field.description or ''} [default: {default}]".strip())
    limits = parser.add_argument_group("input limits (FILIAL_LIMITS__<NAME>)")
    for name, field in WireLimits.model_fields.items():
        if name == "num_classes":  # follows --num-classes
            continue
        limits.add_argument(f"--{name.replace('_', '-')}", dest=f"limits.{name}", default=None, metavar="N",
                            help=f"[default: {field.default}]")


def settings_from_flags(args: argparse.Namespace) -> Settings:
    """Settings from the environment, .env and the flags given; raises SettingsError naming fields."""
    flags: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("limits."):
            limits[key[7:]] = value
        elif key in FLAT_NAMES:
            flags[key] = value
    if limits:
        flags["limits"] = limits
    return load_settings(**flags)
