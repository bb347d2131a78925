"""An example skipnets plugin package: the ``BlockCensus`` callback and the ``example_resmlp``
architecture, both found by skipnets through entry points declared in ``pyproject.toml``."""
