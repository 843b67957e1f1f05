"""The ``filial`` command: run, produce, demo, bench here; watch, status, rollback in
:mod:`daemon.cli.follow`; serve in :mod:`daemon.serve.command`.

Every subcommand has ``--help``. Mistakes (a bad flag value, an unreachable server) end with
one line saying what is wrong and what to do, and exit code 2; no tracebacks for user errors.
Each subcommand is a thin adapter from argparse to the layer that does the work (run's flags:
service/flags.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from daemon.cli.errors import UserError

log = logging.getLogger("filial.cli")



# --- settings flags ---------------------------------------------------------------------------------
def _settings_from(args: argparse.Namespace):
    from daemon.service.flags import settings_from_flags
    from daemon.service.settings import SettingsError

    try:
        return settings_from_flags(args)
    except SettingsError as exc:
        raise UserError(f"{exc}\n(fix the flag or FILIAL_* variable named above; see 'filial run --help')") from None


# --- run ---------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import gc

    from daemon.service.embedded import EmbeddedInfrastructure
    from daemon.service.failpoints import Failpoints
    from daemon.service.logs import log_settings, setup_logging
    from daemon.service.service import Service
    from daemon.service.signals import stop_service_on_signals

    settings = _settings_from(args)
    setup_logging(settings.ops.log_level, settings.ops.log_format)
    log_settings(settings, os.environ)
    with EmbeddedInfrastructure(settings) as live:
        service = Service(live, failpoints=Failpoints.from_env())  # make chaos's markers; inert otherwise
        # Python's full (generation-2) collection walks every object the process holds; after torch and the rest
        # are imported that takes 112-140 ms, a pause that lands in whatever runs then (a batch, a follower's
        # load), 13-22 ms once they are frozen. Objects made during start-up live as long as the process, so
        # they are moved out of the collector's sight (once what is already garbage is collected; README,
        # "Throughput").
        gc.collect()
        gc.freeze()
        # the handler only wakes a watcher (no lock in it); a stop signal after the service stopped is
        # ignored: the process is only exiting, and a late second signal must not kill it with -15
        with stop_service_on_signals(service, ignore_after=True):
            service.run()
    return 0


# --- serve: its flags, wording and server are daemon/serve/command.py's ------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.serve.command import serve
    from daemon.service.logs import setup_logging

    return serve(args, setup_logging, UserError)  # the logging setup and the user errors are the CLI's


# --- produce -------------------------------------------------------------------------------------------
# produce, demo and bench run code from tools/ and benchmarks/, outside the runtime, imported only here
# and only inside those subcommands. Their dependencies are the optional ``tools`` extra; when it (or
# the packages themselves) is missing, the subcommand says so in one line and exits 2.
TOOLS_HINT = "pip install 'filial[tools]' (in a checkout: pip install -e '.[tools]')"
# top-level modules whose absence means "the tools are not installed": tools.EXTRA_MODULES and the packages
_TOOLS_MODULES = {"tools": "the tools package", "benchmarks": "the benchmarks package", "mlxtend": "mlxtend",
                  "sklearn": "scikit-learn", "matplotlib": "matplotlib", "httpx": "httpx"}


def _tools_problem(what: str, exc: ImportError) -> str | None:
    """One line saying what to install when ``exc`` is a missing tools module; None for any other error."""
    top = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if top not in _TOOLS_MODULES:
        return None
    return f"{what} needs {_TOOLS_MODULES[top]}, which is not installed here; install the tools: {TOOLS_HINT}"


class _ToolsNeeded:
    """``with _ToolsNeeded("the demo"):`` turns a missing tools module into a :class:`UserError`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        problem = _tools_problem(self.what, exc) if isinstance(exc, ImportError) else None
        if problem is not None:
            raise UserError(problem) from None
        return False


def cmd_produce(args: argparse.Namespace) -> int:
    from consumers.connection import KafkaConnection

    with _ToolsNeeded("filial produce"):
        from tools.datasets import load_dataset
        from tools.produce import produce_phases
        from tools.scenarios import parse_phase

    try:
        phases = [parse_phase(p) for p in (args.phase or ["all=identity"])]
        with _ToolsNeeded(f"the dataset {args.dataset!r}"):
            data = load_dataset(args.dataset)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    def progress(phase: str, i: int, total: int) -> None:
        print(f"{phase}: batch {i}/{total}", file=sys.stderr, flush=True)

    report = produce_phases(KafkaConnection(bootstrap=args.kafka_bootstrap), args.topic, data, phases,
                            batch_size=args.batch_size, rate=args.rate, samples_per_phase=args.samples_per_phase,
                            seed=args.seed, on_batch=progress)
    print(json.dumps({"batches": report.batches, "samples": report.samples, "per_phase": report.per_phase,
                      "seconds": round(report.seconds, 2)}))
    return 0


# --- demo and bench ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.service.logs import setup_logging

    with _ToolsNeeded("the demo"):  # the dataset is loaded before any server starts
        from tools.demo import run_demo

        setup_logging("INFO", "text")
        summary = run_demo(phases=args.phase, samples_per_phase=args.samples_per_phase,
                           batch_size=args.batch_size)
    print(json.dumps(summary), flush=True)
    return 0 if "watcher_error" not in summary else 1


BENCHES = ("merge", "hkt", "drift", "pause", "soak", "cl", "ablation", "serve", "ingest", "keep_cost", "scale",
           "throughput")


def cmd_bench(args: argparse.Namespace) -> int:
    what = f"the benchmark {args.bench!r}"
    if args.bench_main is None:  # its module did not import (_BenchParser says why)
        raise UserError(args.bench_problem)
    with _ToolsNeeded(what):
        from tools import missing_dependencies

        missing = missing_dependencies()  # checked first: a plot must not fail after an hour of work
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}, which is not installed here; "
                        f"install the tools: {TOOLS_HINT}")
    from daemon.service.logs import setup_logging

    setup_logging("INFO", "text")
    with _ToolsNeeded(what):
        summary = args.bench_main(args)
    print(json.dumps(summary), flush=True)
    return 0


class _BenchParser(argparse.ArgumentParser):
    """``filial bench <name>``: filled in from ``benchmarks.<name>`` only when that subcommand is parsed,
    so no other command imports the benchmarks. A module that does not import is still listed:
    ``--help`` says why, and running it fails in one line (exit 2)."""

    bench_name: str | None = None
    bench_problem: str | None = None

    def _load(self) -> None:
        import importlib

        name, self.bench_name = self.bench_name, None
        if name is None:
            return  # loaded already
        what = f"the benchmark {name!r}"
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as exc:
            self.bench_problem = (_tools_problem(what, exc)
                                  or f"{what} cannot be imported ({type(exc).__name__}: {exc})")
            self.description = f"Unavailable here.\n\n{self.bench_problem}"
            return
        self.description = module.__doc__
        module.add_arguments(self)
        self.set_defaults(bench_main=module.main)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        if self.bench_problem is None:
            return super().parse_known_args(args, namespace)
        if {"-h", "--help"} & set(args or ()):
            self.print_help()
            self.exit(0)
        namespace = namespace or argparse.Namespace()
        namespace.func, namespace.bench_main, namespace.bench_problem = cmd_bench, None, self.bench_problem
        return namespace, []  # its options are unknown: whatever was given, cmd_bench says why it cannot run


def _bench_summary(name: str) -> str:
    """The first line of ``benchmarks/<name>.py``'s docstring, read without importing anything."""
    import ast
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("benchmarks")  # finds the package without running it
        path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (AttributeError, TypeError, StopIteration, OSError, SyntaxError, ValueError, ImportError):
        return "(unavailable here: 'filial bench " + name + " --help' says why)"
    return doc.strip().splitlines()[0] if doc else name


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object as its last line",
                           description="Benchmarks (they need the tools extra: " + TOOLS_HINT + "). Each prints "
                                       "progress on stderr and one JSON object as the last line of stdout; plots "
                                       "go to --out-dir.")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}",
                                 parser_class=_BenchParser)
    for name in BENCHES:
        p = kinds.add_parser(name, help=_bench_summary(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.bench_name = name
        p.set_defaults(func=cmd_bench, bench_main=None, bench_problem=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filial", description="Event-driven continual learning: Kafka batches in, drift-aware children, "
                                   "scheduled merges, versioned models out to Redis.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon",
                         description="Consume batches, detect drift, train children, merge on a schedule and "
                                     "publish versions. With no --kafka-bootstrap / --redis-url, embedded servers "
                                     "are started (in memory; for trying filial out). SIGTERM/SIGINT stop it "
                                     "cleanly: the batch in hand finishes and applied offsets are committed.")
    from daemon.service.flags import add_settings_flags

    add_settings_flags(run)
    run.set_defaults(func=cmd_run)

    produce = sub.add_parser("produce", help="stream a dataset into a topic as batches",
                             description="Stream a dataset into the topic in phases, each a named slice with its "
                                         "own shift. Datasets: mnist5k, digits (bundled with the tools extra: "
                                         + TOOLS_HINT + "), torchvision:<Class>[:<root>], npz:<path>. "
                                         "Phases: name=transform[,..] with rotate:<deg>, permute:<seed>, "
                                         "noise:<std>, classes:<a>-<b>, identity.",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="example: filial produce --kafka-bootstrap localhost:9092 --dataset mnist5k "
                                    "--phase upright=identity --phase rot90=rotate:90 --rate 5")
    produce.add_argument("--kafka-bootstrap", required=True, help="host:port of the broker")
    produce.add_argument("--topic", default="filial.batches")
    produce.add_argument("--dataset", default="mnist5k")
    produce.add_argument("--phase", action="append", help="name=transform[,transform]; repeat for each phase")
    produce.add_argument("--batch-size", type=int, default=128)
    produce.add_argument("--samples-per-phase", type=int, default=None, help="default: dataset split evenly")
    produce.add_argument("--rate", type=float, default=None, help="max batches per second (default: as fast as possible)")
    produce.add_argument("--seed", type=int, default=0)
    produce.set_defaults(func=cmd_produce)

    from daemon.cli.follow import add_follow_commands
    from daemon.serve.command import add_serve_parser

    add_follow_commands(sub)
    add_serve_parser(sub, cmd_serve)

    demo = sub.add_parser("demo", help="the whole path on embedded servers (what `make demo` runs)",
                          description="Start an embedded broker and Redis, run the daemon, stream drifting "
                                      "phases of MNIST-5k, follow the versions, stop cleanly; the last line of "
                                      "stdout is a JSON summary. Needs the tools extra: " + TOOLS_HINT + ".")
    demo.add_argument("--phase", action="append", help="override the phases (name=transform, repeatable)")
    demo.add_argument("--samples-per-phase", type=int, default=1600)
    demo.add_argument("--batch-size", type=int, default=100)
    demo.set_defaults(func=cmd_demo)

    _add_bench(sub)
    return parser


def _connection_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError
    from redis.exceptions import ConnectionError as RedisConnectionError

    return ConnectionError, RedisConnectionError, KafkaConnectionError, KafkaTimeoutError


# torch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this is set;
# read once, at torch's first large allocation, so it must be in the environment before torch works.
# Loading a 10M-parameter version (building the model, copying the state in) takes 9-11 ms with it and
# 22-26 ms without, the difference page faults (README, "Throughput"); training was no faster or slower
# with it. A value the operator set is kept.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"filial {args.command}: {exc}", file=sys.stderr)
        return 2
    except _connection_errors() as exc:
        print(f"filial {args.command}: cannot connect ({exc}); check the address and that the server runs",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

