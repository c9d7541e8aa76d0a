"""Numerically careful scalar helpers shared by the primitives.

Counters are int32 and saturate at the int32 maximum instead of wrapping; bias corrections are
computed as ``-expm1(t·log β)`` (exact for β close to 1 where ``1 - β**t`` loses digits); arithmetic on
low-precision leaves is done in float32 and rounded once when stored.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _validate

__all__ = [
    "INT32_MAX", "init_count", "safe_increment", "compute_dtype", "bias_correction", "value_at",
    "abs_sq", "as_compute", "state_dtype", "as_stored", "hyper", "log_decay", "unshared",
    "computed_once",
]

INT32_MAX = int(np.iinfo(np.int32).max)


def init_count() -> jax.Array:
    """A fresh step counter: int32 zero.

    Example:
        >>> from gradtx import numerics
        >>> c = numerics.init_count()
        >>> c.dtype.name, int(c)
        ('int32', 0)
    """
    return jnp.zeros((), jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping to a negative step.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> int(numerics.safe_increment(jnp.int32(numerics.INT32_MAX))) == numerics.INT32_MAX
        True
    """
    count = jnp.asarray(count, jnp.int32)
    return jnp.where(count < INT32_MAX, count + jnp.ones((), jnp.int32), count)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic on a leaf of ``dtype`` is done in: at least float32.

    float64 stays float64 (under x64), complex stays complex, everything narrower becomes float32.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> numerics.compute_dtype(jnp.bfloat16).name, numerics.compute_dtype(jnp.float32).name
        ('float32', 'float32')
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128), jnp.dtype(jnp.complex64)):
        return dtype
    return jnp.dtype(jnp.float32)


def as_compute(x: jax.Array) -> jax.Array:
    """``x`` cast to its compute dtype (see :func:`compute_dtype`).

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> numerics.as_compute(jnp.ones(2, jnp.float16)).dtype.name
        'float32'
    """
    x = jnp.asarray(x)
    ct = compute_dtype(x.dtype)
    return x if x.dtype == ct else x.astype(ct)


def state_dtype(requested: str | None, leaf: Any) -> jnp.dtype:
    """The storage dtype of a per-parameter state leaf: ``requested`` or, if None, the leaf's own.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> numerics.state_dtype(None, jnp.ones(2, jnp.bfloat16)).name, numerics.state_dtype("float32", 1.0).name
        ('bfloat16', 'float32')
    """
    return jnp.dtype(requested) if requested is not None else jnp.result_type(leaf)


def as_stored(x: jax.Array, storage_dtype: Any) -> jax.Array:
    """A new state value ``x`` as the rest of the step reads it: ``bf16(x)`` when it is stored in
    bfloat16, ``x`` itself (unrounded) for every other storage dtype.

    Every gradtx primitive that keeps a moment computes the new moment in its compute dtype
    (float32) and stores it in the state's dtype (``mu_dtype``/``nu_dtype``, the parameter's by
    default). With bfloat16 storage, the update (and any later use in the same step) reads the
    rounded value, the value the state holds: the moment's buffer is then read after it is
    written, never recomputed from the old one, so a jitted step with donated state updates it in
    place (recomputing makes XLA copy the donated buffer first: AdamW with a bfloat16 first moment
    on a 16M-element leaf took 18.5 ms against Optax's 34.4, which reads the unrounded moment and
    pays the copy, and against 20.4 ms with float32 moments; ``benchmarks/RESULTS-bf16mu.md``),
    and the update is a function of the saved state. Rounding to bfloat16 keeps float32's exponent range,
    so it changes only the last bits (relative error ≤ 2⁻⁹). float16 storage is read unrounded:
    its range would flush a small second moment to zero (its smallest positive value is 6e-8)
    and the update would divide by ``ε``. Optax's ``mu_dtype`` uses the unrounded
    moment; torch's for-loop and ``foreach`` optimizers, whose state has the parameters' dtype,
    update it in that dtype and read it back rounded.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> x = jnp.array([1.0 + 2 ** -10], jnp.float32)
        >>> numerics.as_stored(x, jnp.bfloat16).tolist(), numerics.as_stored(x, jnp.float16).tolist()
        ([1.0], [1.0009765625])
    """
    if jnp.dtype(storage_dtype) == jnp.dtype(jnp.bfloat16) and x.dtype != storage_dtype:
        return x.astype(storage_dtype).astype(x.dtype)
    return x


def value_at(hyper: Any, count: jax.Array) -> jax.Array:
    """Evaluate a hyperparameter at a step count: schedules are called, numbers are returned.

    The result is a float32 array (a traced hyperparameter or a schedule's output is cast to
    float32, never to a parameter's low-precision dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> float(numerics.value_at(0.5, None)), float(numerics.value_at(lambda t: 0.5 ** t, jnp.int32(3)))
        (0.5, 0.125)
    """
    if _validate.is_schedule(hyper):
        return jnp.asarray(hyper(count), jnp.float32)
    return hyper_array(hyper)


def hyper_array(value: Any) -> jax.Array:
    """A numeric hyperparameter as a float32 scalar array that XLA treats as a run-time value.

    A Python float would become a compile-time constant, and XLA rewrites arithmetic on constants
    (``x / c`` becomes ``x * (1/c)``, which is not correctly rounded). Passing the constant through
    an optimisation barrier keeps divisions exact and makes the compiled program the same whether
    the hyperparameter is a Python float or a float32 array injected into the state.
    """
    if _validate.is_traced(value) or isinstance(value, jax.Array):
        return jnp.asarray(value, jnp.float32)
    return jax.lax.optimization_barrier(jnp.asarray(value, jnp.float32))


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` in float32, accurate for decay close to 1.

    ``decay`` enters as its float32 value (as every hyperparameter does, so a value injected into the
    state by :func:`gradtx.inject_hyperparams` gives bit-identical results), and the power is
    computed as ``-expm1(count · log1p(decay - 1))``: ``decay - 1`` is exact in float32 for
    ``decay >= 0.5`` and neither step cancels, so the result is accurate to float32 rounding even for
    ``decay = 0.999`` at ``count = 1``. For ``decay == 0`` it is 1 for every ``count >= 1``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> float(numerics.bias_correction(0.5, jnp.int32(2)))
        0.75
    """
    t = jnp.asarray(count, jnp.float32)
    return -jnp.expm1(t * log_decay(decay))


def log_decay(decay: Any) -> jax.Array:
    """``log(decay)`` in float32, accurate near 1 (via ``log1p(decay - 1)``); ``-inf`` at 0.

    Example:
        >>> from gradtx import numerics
        >>> float(numerics.log_decay(1.0)), float(numerics.log_decay(0.0))
        (0.0, -inf)
    """
    decay = hyper_array(decay)
    near_one = jnp.log1p(jnp.minimum(decay, jnp.ones_like(decay)) - 1.0)
    return jnp.where(decay >= 0.5, near_one, jnp.log(decay))


def hyper(value: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A hyperparameter as the array it enters arithmetic as: its float32 value, cast to ``dtype``.

    Every primitive reads its hyperparameters through this (or :func:`value_at`), so a Python float
    and the same value injected into the state as a float32 array give bit-identical results.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> x = numerics.hyper(0.1)
        >>> x.dtype.name, float(x) == float(jnp.float32(0.1))
        ('float32', True)
    """
    x = hyper_array(value)
    return x if jnp.dtype(dtype) == jnp.float32 else x.astype(dtype)


def unshared(x):
    """``x`` itself (any pytree of arrays), hidden from XLA's common-subexpression elimination.

    For primitives that use one parameter-sized expression twice. When such an expression
    (Adafactor's ``G² + ε₁`` and direction ``G/√V̂``, Adadelta's ``Δ``, even a bfloat16 leaf
    converted to float32) feeds both a reduction or state update and another loop, XLA's CPU
    backend computes it once into a fresh parameter-sized buffer (a 64 MiB temporary for a
    4096×4096 leaf, paid again in page faults on every step) and reads it back twice. Building the
    second use from ``unshared`` *inputs* -- arrays that exist anyway, and the scalars the
    expression broadcasts, whose parameter-sized broadcast XLA would otherwise also share and
    materialise -- gives an independent expression, fused into its own loop: same values, one more
    read of the inputs, no temporary. XLA merges two barriers over the same operands, so each call
    site must wrap a different tuple. This halved Adafactor's step on a 16M-element leaf. It is
    ``jax.lax.optimization_barrier``; neither Optax nor torch has an equivalent helper.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> g, eps = numerics.unshared((jnp.array([1.0, -2.0]), jnp.float32(0.5)))
        >>> (g * g + eps).tolist()
        [1.5, 4.5]
    """
    return jax.lax.optimization_barrier(x)


def computed_once(x: jax.Array, count: jax.Array) -> jax.Array:
    """``x`` itself (``x / 1``, exact for every value), which XLA computes once and reads back.

    XLA's fusion copies a cheap elementwise expression into every loop that consumes it. For a
    new state value that is also written to its donated buffer (Adam's ``m'``), that means a
    later loop recomputes it from the *old* state -- and then the old buffer cannot be updated in
    place: XLA copies it first. A division by an array is an operation XLA never duplicates, so
    every consumer reads the value from its buffer. The divisor is ``where(count < 0, x, 1)``:
    ``count`` is the transform's int32 step count, never negative, but XLA cannot rule that out
    at compile time, so the division stays in the program (a division by a scalar, even a
    run-time one, is rewritten into a multiplication by its reciprocal, which XLA does
    duplicate). ``x / 1`` is ``x`` bit for bit (NaN, ±inf and -0 included) in every real floating
    dtype, and its derivative is 1. A bfloat16 ``x`` is divided in float32 and rounded back
    (exact): XLA's CPU backend computes a bfloat16 division in float32 anyway, and given the
    bfloat16 division it lets the later loops read that float32 quotient, a float32 temporary
    twice the size of the buffer it was meant to keep in use. Complex ``x`` is returned as it is
    (a complex division by ``1 + 0j`` can turn -0 into +0). Used by :class:`gradtx.scale_by_adam`
    for the moments it keeps for a replay, so that :class:`gradtx.chain` can take a trust ratio's
    norm from them (see ``docs/performance.md``), and for AMSGrad's running maximum in bfloat16.
    Neither Optax nor torch has an equivalent.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> x = jnp.array([1.5, -0.0, jnp.inf])
        >>> y = numerics.computed_once(x, jnp.int32(3))
        >>> y.tolist(), bool(jnp.signbit(y[1]))
        ([1.5, -0.0, inf], True)
    """
    if jnp.iscomplexobj(x):
        return x
    if x.dtype == jnp.bfloat16:
        wide = x.astype(jnp.float32)
        return (wide / jnp.where(count < 0, wide, jnp.ones((), wide.dtype))).astype(x.dtype)
    return x / jnp.where(count < 0, x, jnp.ones((), x.dtype))


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|²``: ``x·x`` for real, ``x·conj(x)`` (real) for complex leaves.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx import numerics
        >>> numerics.abs_sq(jnp.array([3 + 4j])).tolist(), numerics.abs_sq(jnp.array([-2.0])).tolist()
        ([25.0], [4.0])
    """
    if jnp.iscomplexobj(x):
        return jnp.real(x * jnp.conj(x))
    return x * x
