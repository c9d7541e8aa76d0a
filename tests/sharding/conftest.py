"""The ``_*.py`` files here are scripts run in subprocesses (they need 8 simulated devices or
``jax.distributed`` set up before JAX starts); never import them during collection."""

collect_ignore_glob = ["_*.py"]
