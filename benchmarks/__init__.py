"""Benchmarks behind ``filial bench``. Each prints progress on stderr and one JSON object last on stdout.

Outside the runtime, like tools/: they need the ``tools`` extra (``pip install 'filial[tools]'``) and
only the CLI's ``bench`` subcommand imports them. Each module has ``add_arguments(parser)`` and
``main(args) -> dict``.
"""

from __future__ import annotations

import sys
from typing import Callable


def progress(bench: str) -> Callable[[str], None]:
    """The progress printer of one bench: ``[bench <name>] ...`` on stderr, so stdout keeps only the JSON
    (print, not logging: ``python -m benchmarks.<name>`` configures no logging, and soak quiets ``filial``)."""
    def log(msg: str) -> None:
        print(f"[bench {bench}] {msg}", file=sys.stderr, flush=True)

    return log


def rss_mb() -> float:
    """This process's resident memory in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
