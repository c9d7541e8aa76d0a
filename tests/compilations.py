"""Counting XLA compilations in tests, through ``jax.monitoring``.

JAX records the backend-compile duration event once per compiled program, whether the program
is a ``jit`` or a single primitive run outside ``jit``, so the count catches op-by-op compilation
as well as recompilation of a step.
"""

from __future__ import annotations

import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = []


def _listener(event, duration=None, **kwargs):
    if event == BACKEND_COMPILE:
        _compiles.append(event)


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as n: ...`` -- afterwards ``n[0]`` is the number of programs
    XLA compiled inside the block."""
    start = len(_compiles)
    box = []
    yield box
    box.append(len(_compiles) - start)
