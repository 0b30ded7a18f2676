"""The parts of the serving benchmark, ``bench/serve.py``: its plan and command line
(:mod:`~bench.servelib.plan`), the HTTP load phases (:mod:`~bench.servelib.phases`), one
victim measured in-process and over HTTP (:mod:`~bench.servelib.measure`) and the tables that
report it (:mod:`~bench.servelib.report`).
"""
