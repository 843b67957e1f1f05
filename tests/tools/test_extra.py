"""The ``tools`` extra: what tools/ and benchmarks/ need beyond the runtime, declared once and
checked three ways (pyproject, tools.EXTRA_MODULES, the CLI's message), and absent from the runtime."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from daemon import cli
from tools import EXTRA_MODULES, missing_dependencies

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_extra_is_declared_once_and_the_runtime_does_not_install_it():
    extra = _names(PROJECT["optional-dependencies"]["tools"])
    assert extra == set(EXTRA_MODULES.values())
    assert not extra & _names(PROJECT["dependencies"]), "the runtime must not install the tools' dependencies"


def test_the_cli_recognises_every_missing_tool():
    assert set(cli._TOOLS_MODULES) == set(EXTRA_MODULES) | {"tools", "benchmarks"}
    assert "pip install 'filial[tools]'" in cli.TOOLS_HINT


def test_make_test_installs_the_extra():
    assert missing_dependencies() == []
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -e '.[dev,tools]'" in makefile


def test_missing_dependencies_names_the_distribution(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec then reports it missing
    assert missing_dependencies() == ["scikit-learn"]
