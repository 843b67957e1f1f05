"""The layers, checked from the source: no module imports from a layer above its own.

Data flows Kafka → consumers → daemon → zoo_store → Redis, and imports only go down that path
and down the daemon's own layers (docs/architecture.md, "Layers"):

- ``daemon.learn``: pure torch. Imports nothing of the engine, the service, the CLI, consumers,
  zoo_store, tools or benchmarks, and no ``kafka``, ``redis``, ``apscheduler``, ``threading``,
  ``concurrent.futures`` or ``multiprocessing``: no threads, no I/O.
- ``daemon.engine``: owns the lock, knows no Kafka or Redis names. Imports nothing of the service,
  the CLI, tools or benchmarks, and nothing it imports, however indirectly, imports ``kafka``,
  ``redis`` or ``apscheduler``. So it may use the *data* modules of consumers and zoo_store (the
  wire types ``consumers.wire``, the manifest models ``zoo_store.models``, ...) and never their
  clients (``consumers.batch_consumer``, ``zoo_store.versions``, ...).
- ``daemon.service``: the runtime. May import the engine, learn, consumers and zoo_store; never
  the CLI, tools or benchmarks.
- ``consumers`` and ``zoo_store``: never import ``daemon``, ``tools`` or ``benchmarks``.
- ``daemon.cli`` is the composition root: the only runtime module that may import tools and
  benchmarks, and only inside the subcommands that use them (never at module level), so
  ``filial run`` neither needs nor loads them. No runtime module reaches tools or benchmarks
  through another.
- ``tools`` never imports ``benchmarks`` (the benchmarks use the tools' datasets, not the reverse).
- Every module of ``daemon`` is in a layer (``learn``, ``engine``, ``service``) or is the CLI.

Every import counts: module level, inside functions and classes, under ``if TYPE_CHECKING:``, and
``importlib.import_module("literal...")``. Relative imports are resolved. A failure names each
offending ``file:line`` and the import chain. (Over 300 lines because it carries its own import
reader, and tests of that reader, so the rules cannot pass by not seeing an import.)
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "consumers", "zoo_store", "tools", "benchmarks")
RUNTIME = ("daemon", "consumers", "zoo_store")
OUTSIDE = ("tools", "benchmarks")


# --- reading imports --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    path: str      # file, relative to the repository root
    line: int
    module: str    # the importing module
    target: str    # what is imported: a module, or module.name for ``from module import name``
    lazy: bool     # inside a function (runs when called, not when the module is imported)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}{' (in a function)' if self.lazy else ''}"


def _dynamic_target(call: ast.Call) -> str | None:
    """The module named by ``importlib.import_module(...)`` / ``__import__(...)``: a literal, or the
    literal start of an f-string (``f"benchmarks.{name}"`` -> ``benchmarks``); None otherwise."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        prefix = ""
        for part in arg.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            prefix += part.value
        prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        return prefix or None
    return None


def parse_imports(source: str, module: str, path: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the text of ``module``, found at ``path``)."""
    tree = ast.parse(source, filename=path)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(path, child.lineno, module, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".") if package else []
                    parts = parts[:len(parts) - (child.level - 1)] if child.level > 1 else parts
                    base = ".".join(parts + ([child.module] if child.module else []))
                for alias in child.names:
                    target = base if alias.name == "*" else f"{base}.{alias.name}" if base else alias.name
                    found.append(Import(path, child.lineno, module, target, lazy))
            elif isinstance(child, ast.Call) and (target := _dynamic_target(child)):
                found.append(Import(path, child.lineno, module, target, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _load() -> tuple[dict[str, str], dict[str, list[Import]]]:
    """(module -> file, module -> its imports) for every module of the repository's packages."""
    files, imports = {}, {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name, is_package = _module_name(path)
            rel = str(path.relative_to(ROOT))
            files[name] = rel
            imports[name] = parse_imports(path.read_text(), name, rel, is_package)
    return files, imports


FILES, IMPORTS = _load()


def within(name: str, prefixes) -> bool:
    """``name`` is one of ``prefixes`` or inside one (``daemon.learn.drift`` is within ``daemon.learn``)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def local_modules(target: str, files=None) -> list[str]:
    """The repository modules an import of ``target`` runs: the longest prefix that is a module, and
    the packages above it. Empty for a third-party or standard-library target."""
    files = FILES if files is None else files
    parts = target.split(".")
    found = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files]
    return sorted(set(found), key=len)


def reachable(start: str, forbidden, imports=None, files=None) -> list[list[Import]]:
    """Import chains from module ``start`` to any target within ``forbidden`` (one chain per forbidden
    import reached, shortest first), following imports into the repository's modules."""
    imports = IMPORTS if imports is None else imports
    files = FILES if files is None else files
    chains: list[list[Import]] = []
    seen = {start}
    queue: deque[tuple[str, list[Import]]] = deque([(start, [])])
    while queue:
        module, chain = queue.popleft()
        for imp in imports.get(module, []):
            if within(imp.target, forbidden):
                chains.append(chain + [imp])
                continue
            for nxt in local_modules(imp.target, files):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, chain + [imp]))
    return chains


def _chain(chain: list[Import]) -> str:
    return str(chain[0]) + "".join(f"\n      via {imp}" for imp in chain[1:])


# --- the rules -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    layer: str                     # modules within this prefix...
    direct: tuple[str, ...] = ()   # ...import nothing within these...
    reached: tuple[str, ...] = ()  # ...and reach nothing within these through any chain of imports
    why: str = ""
    exempt: tuple[str, ...] = ()   # modules of the layer the rule does not apply to


RULES = [
    Rule("daemon.learn",
         direct=("daemon.engine", "daemon.service", "daemon.cli", "consumers", "zoo_store", "tools", "benchmarks"),
         reached=("kafka", "redis", "apscheduler", "threading", "concurrent.futures", "multiprocessing"),
         why="learn is pure torch: no threads, no I/O, nothing from a layer above"),
    Rule("daemon.engine", direct=("daemon.service", "daemon.cli", "tools", "benchmarks"),
         reached=("kafka", "redis", "apscheduler"),
         why="the engine owns the lock and knows no Kafka or Redis names: it may use the data modules of "
             "consumers and zoo_store, never their clients"),
    Rule("daemon.service", direct=("daemon.cli", "tools", "benchmarks"),
         why="the service is the runtime: the CLI composes it, tools and benchmarks drive it from outside"),
    Rule("daemon.serve", direct=("daemon.engine", "daemon.service", "daemon.cli", "tools", "benchmarks"),
         why="serving sits beside the service: it uses learn, zoo_store and the wire conventions, never the "
             "engine, the service or the CLI (the CLI hands it the logging setup)"),
    Rule("consumers", direct=("daemon", "tools", "benchmarks"), why="consumers are below the daemon"),
    Rule("zoo_store", direct=("daemon", "tools", "benchmarks"), why="zoo_store is below the daemon"),
    Rule("daemon", reached=("tools", "benchmarks"), exempt=("daemon.cli",),
         why="tools and benchmarks are outside the runtime; only the CLI (lazily) imports them"),
    Rule("consumers", reached=("tools", "benchmarks"), why="tools and benchmarks are outside the runtime"),
    Rule("zoo_store", reached=("tools", "benchmarks"), why="tools and benchmarks are outside the runtime"),
    Rule("tools", direct=("benchmarks",), why="benchmarks use the tools, not the reverse"),
]


def violations(rule: Rule, imports=None, files=None) -> list[str]:
    imports = IMPORTS if imports is None else imports
    files = FILES if files is None else files
    found = []
    for module in sorted(imports):
        if not within(module, rule.layer) or within(module, rule.exempt):
            continue
        found += [str(imp) for imp in imports[module] if within(imp.target, rule.direct)]
        if rule.reached:
            # each forbidden import once: where it is written (not again from every module that reaches
            # it), and not through an import already reported as a direct violation
            found += [_chain(chain) for chain in reachable(module, rule.reached, imports, files)
                      if (len(chain) == 1 or not within(chain[-1].module, rule.layer))
                      and not within(chain[0].target, rule.direct)]
    return found


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.layer}-{'direct' if r.direct else 'reached'}")
def test_no_import_from_a_layer_above(rule):
    problems = violations(rule)
    assert not problems, (f"{rule.layer}: {rule.why} (docs/architecture.md, \"Layers\"):\n  "
                          + "\n  ".join(problems))


def test_only_the_cli_imports_tools_and_benchmarks_and_only_inside_a_subcommand():
    problems = [str(imp) for module, imps in IMPORTS.items() if within(module, RUNTIME)
                for imp in imps if within(imp.target, OUTSIDE) and (module != "daemon.cli" or not imp.lazy)]
    assert not problems, ("tools/benchmarks imported by the runtime (only daemon/cli.py may, inside the "
                          "subcommand that needs them):\n  " + "\n  ".join(problems))
    cli = [imp for imp in IMPORTS["daemon.cli"] if within(imp.target, OUTSIDE)]
    assert {imp.target.split(".")[0] for imp in cli} == {"tools", "benchmarks"}, cli  # the parser sees them


def test_every_daemon_module_is_in_a_layer():
    layers = ("daemon.learn", "daemon.engine", "daemon.service", "daemon.serve")
    stray = [FILES[m] for m in FILES if within(m, "daemon") and m != "daemon" and not within(m, "daemon.cli")
             and not within(m, layers)]
    assert not stray, f"modules of daemon/ outside learn/, engine/, service/, serve/ (or the CLI): {stray}"


def test_tests_import_helpers_from_tests_helpers_not_conftest():
    problems = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        name, is_package = _module_name(path)
        problems += [str(imp) for imp in parse_imports(path.read_text(), name, rel, is_package)
                     if within(imp.target, "tests.conftest")]
    assert not problems, "conftest.py holds fixtures; plain helpers come from tests.helpers:\n  " + "\n  ".join(problems)


# --- the checker itself ---------------------------------------------------------------------------------------
SAMPLE = '''
import os, threading
from typing import TYPE_CHECKING
from . import sibling
from ..engine import tree as t
from daemon.service.settings import Settings
import importlib

if TYPE_CHECKING:
    from zoo_store.versions import VersionStore


def later(name):
    import kafka.errors
    return importlib.import_module(f"benchmarks.{name}")


class K:
    def m(self):
        from tools import datasets
'''


def test_the_parser_sees_every_kind_of_import():
    found = {(imp.target, imp.line, imp.lazy) for imp in
             parse_imports(SAMPLE, "daemon.learn.sample", "daemon/learn/sample.py")}
    assert found == {("os", 2, False), ("threading", 2, False), ("typing.TYPE_CHECKING", 3, False),
                     ("daemon.learn.sibling", 4, False), ("daemon.engine.tree", 5, False),
                     ("daemon.service.settings.Settings", 6, False), ("importlib", 7, False),
                     ("zoo_store.versions.VersionStore", 10, False), ("kafka.errors", 14, True),
                     ("benchmarks", 15, True), ("tools.datasets", 20, True)}
    # a package's own relative imports resolve inside it
    (imp,) = parse_imports("from .wire import Batch", "consumers", "consumers/__init__.py", is_package=True)
    assert imp.target == "consumers.wire.Batch"


def test_the_rules_catch_what_they_should():
    """A small made-up tree with one violation of each kind: each is reported with its file:line."""
    files = {"daemon.learn.a": "daemon/learn/a.py", "daemon.engine.e": "daemon/engine/e.py",
             "consumers.client": "consumers/client.py", "consumers.wire": "consumers/wire.py",
             "daemon.service.s": "daemon/service/s.py"}
    sources = {
        "daemon.learn.a": "import torch\nimport threading\n",
        "daemon.engine.e": "from consumers.wire import Batch\n\ndef f():\n    from consumers.client import C\n",
        "consumers.client": "import kafka\n",
        "consumers.wire": "import torch\n",
        "daemon.service.s": "import kafka\nfrom daemon.engine.e import Engine\n\ndef g():\n    import tools.demo\n",
    }
    imports = {m: parse_imports(src, m, files[m]) for m, src in sources.items()}
    rules = {r.layer + ("-direct" if r.direct else "-reached"): r for r in RULES}
    learn = violations(rules["daemon.learn-direct"], imports, files)
    assert learn == ["daemon/learn/a.py:2: daemon.learn.a imports threading"]
    engine = violations(rules["daemon.engine-direct"], imports, files)
    assert engine == ["daemon/engine/e.py:4: daemon.engine.e imports consumers.client.C (in a function)\n"
                      "      via consumers/client.py:1: consumers.client imports kafka"]
    service = violations(rules["daemon.service-direct"], imports, files)
    assert service == ["daemon/service/s.py:5: daemon.service.s imports tools.demo (in a function)"]
