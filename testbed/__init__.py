"""The application layer of mlaas-testbed: what composes the provider, the attacker and the
defense for a user.

The ``mlaas`` command line, the demo, the experiment harness, the provider's server process,
benign clients and victim training. Nothing below imports this package: ``mlaas`` (the core),
``defense``, ``server`` and ``attacker`` each stay usable on their own (checked by
import-linter in ``make lint``).
"""
