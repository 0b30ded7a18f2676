"""mlaas-testbed's shared package: what the provider and the attacker both use.

Datasets, architectures, the training loop, metrics, the wire codec and the ``mlaas`` CLI.
It imports neither ``server`` nor ``attacker`` at module level; the CLI loads them lazily,
per subcommand, as the one place where the halves are composed.
"""

__version__ = "0.1.0"
