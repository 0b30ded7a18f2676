"""The parts of the chaos benchmark, ``bench/chaos.py``: its plan (:mod:`~bench.chaoslib.plan`),
the cluster it breaks (:mod:`~bench.chaoslib.cluster`), the retrying clients
(:mod:`~bench.chaoslib.clients`), the chaos schedule (:mod:`~bench.chaoslib.schedule`) and the
count of the query log against what the clients were answered (:mod:`~bench.chaoslib.audit`).
"""
