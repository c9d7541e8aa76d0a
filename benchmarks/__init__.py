"""Performance harness for gradtx: step time, compile time and memory against Optax and torch.

Run ``python -m benchmarks.run --help`` from the repository root; see ``benchmarks/README.md``.
This package imports Optax and torch (as peers); the ``gradtx`` package itself never does.
"""
