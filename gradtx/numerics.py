"""Numerically careful scalar helpers shared by the primitives.

Counters are int32 and saturate at the int32 maximum instead of wrapping; bias corrections are
computed as ``-expm1(t·log β)`` (exact for β close to 1 where ``1 - β**t`` loses digits); arithmetic on
low-precision leaves is done in float32 and rounded once when stored.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _validate

__all__ = [
    "INT32_MAX", "init_count", "safe_increment", "compute_dtype", "bias_correction", "value_at",
    "abs_sq", "as_compute", "state_dtype",
]

INT32_MAX = int(np.iinfo(np.int32).max)


def init_count() -> jax.Array:
    """A fresh step counter: int32 zero."""
    return jnp.zeros((), jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping to a negative step."""
    count = jnp.asarray(count, jnp.int32)
    return jnp.where(count < INT32_MAX, count + jnp.ones((), jnp.int32), count)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic on a leaf of ``dtype`` is done in: at least float32.

    float64 stays float64 (under x64), complex stays complex, everything narrower becomes float32.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128), jnp.dtype(jnp.complex64)):
        return dtype
    return jnp.dtype(jnp.float32)


def as_compute(x: jax.Array) -> jax.Array:
    """``x`` cast to its compute dtype (see :func:`compute_dtype`)."""
    x = jnp.asarray(x)
    ct = compute_dtype(x.dtype)
    return x if x.dtype == ct else x.astype(ct)


def state_dtype(requested: str | None, leaf: Any) -> jnp.dtype:
    """The storage dtype of a per-parameter state leaf: ``requested`` or, if None, the leaf's own."""
    return jnp.dtype(requested) if requested is not None else jnp.result_type(leaf)


def value_at(hyper: Any, count: jax.Array) -> jax.Array:
    """Evaluate a hyperparameter at a step count: schedules are called, numbers are returned.

    The result is a float32 array (a traced hyperparameter or a schedule's output is cast to
    float32, never to a parameter's low-precision dtype).
    """
    if _validate.is_schedule(hyper):
        return jnp.asarray(hyper(count), jnp.float32)
    return jnp.asarray(hyper, jnp.float32)


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` in float32, accurate for decay close to 1.

    Computed as ``-expm1(count · log(decay))``; for ``decay == 0`` it is 1 for every ``count >= 1``.
    A Python-float ``decay`` has its logarithm taken in float64 on the host (``float32(0.999)`` is
    off by 1.3e-8, which would put a 1.3e-5 relative error into ``1 - 0.999**t`` at small ``t``).
    """
    if isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 < decay <= 1:
        log_decay = jnp.asarray(math.log(decay), jnp.float32)
        return -jnp.expm1(jnp.asarray(count, jnp.float32) * log_decay)
    decay = jnp.asarray(decay, jnp.float32)
    t = jnp.asarray(count, jnp.float32)
    safe = jnp.where(decay > 0, decay, jnp.ones_like(decay))
    corrected = -jnp.expm1(t * jnp.log(safe))
    return jnp.where(decay > 0, corrected, jnp.ones_like(corrected))


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|²``: ``x·x`` for real, ``x·conj(x)`` (real) for complex leaves."""
    if jnp.iscomplexobj(x):
        return jnp.real(x * jnp.conj(x))
    return x * x
