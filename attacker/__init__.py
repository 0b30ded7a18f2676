"""The adversary: steals the served model over HTTP only (never imports ``server``/``defense``)."""
