"""Tools upstream of Kafka and around the daemon, outside the runtime: the producer and its datasets
and drift scenarios (``filial produce``), the demo (``filial demo``) and the chaos driver (``make chaos``).

They need the ``tools`` extra (``pip install 'filial[tools]'``: the bundled datasets and plotting).
The daemon (daemon/, consumers/, zoo_store/) never imports this package; only the ``filial`` command
does, inside the subcommands that use it (tests/test_layers.py checks both).
"""

from __future__ import annotations

import importlib.util

# What the ``tools`` extra in pyproject.toml installs: import name -> distribution name.
EXTRA_MODULES = {"mlxtend": "mlxtend", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "httpx": "httpx"}


def missing_dependencies() -> list[str]:
    """Distributions of the ``tools`` extra that cannot be imported here (empty when it is installed)."""
    return [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
