"""mlaas-testbed's core: what the provider, the defense and the attacker all build on.

Images, the wire schema and codecs, data sets and benign shifts, architectures, the training
loop, the model store, plots and the plain API client. It imports no other package of the
project (checked by import-linter in ``make lint``); the ``mlaas`` command line lives in
``testbed``, the application layer above everything.
"""

__version__ = "0.1.0"
