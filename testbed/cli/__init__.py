"""The ``mlaas`` command line: the one place where the provider, the attacker and the
defense are composed for a user.

Each command imports what it runs inside its body, which keeps ``mlaas --help`` and
``mlaas keys`` fast (no torch import). Results go to standard output; messages and progress
to standard error, so that scripts can capture a command's output
(``KEY=$(mlaas keys create alice)``).
"""

from __future__ import annotations

# Importing the command modules registers their commands on ``app``, in help order.
from testbed.cli import attack, data, db, defense, experiment, service
from testbed.cli.common import app
from testbed.cli.service import parse_since

__all__ = ["app", "attack", "data", "db", "defense", "experiment", "main", "parse_since", "service"]


def main() -> None:
    app()
