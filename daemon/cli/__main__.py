"""``python -m daemon.cli``: the ``filial`` command (used by tests and the chaos driver to run a daemon
as a child process)."""

import sys

from daemon.cli import main

sys.exit(main())
