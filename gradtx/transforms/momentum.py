"""Momentum primitives: heavy-ball / Nesterov momentum (``trace``) and exponential moving averages.

An accumulator stored in bfloat16 (``accumulator_dtype``, or bfloat16 parameters) is read back as
stored by the update; one stored in float16 is used unrounded (:func:`gradtx.numerics.as_stored`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import numerics
from gradtx.base import Transform, hyperparameter, option, transform
from gradtx.tree import map_leaves, zeros_like

__all__ = ["trace", "TraceState", "ema", "EmaState"]


class TraceState(NamedTuple):
    """State of :class:`trace`: the step count (int32) and the momentum buffer ``b``."""

    count: jax.Array
    trace: Any


class EmaState(NamedTuple):
    """State of :class:`ema`: the step count (int32) and the (not debiased) moving average ``m``."""

    count: jax.Array
    ema: Any


@transform
class trace(Transform):
    """Momentum, exactly as ``torch.optim.SGD`` keeps its buffer.

    With decay ``μ`` (the momentum) and dampening ``τ``::

        b_1 = g_1                                (first step: the buffer starts at the gradient)
        b_t = μ_t · b_{t-1} + (1 - τ) · g_t      (t > 1)
        u_t = g_t + μ_t · b_t   if nesterov  else  b_t

    Defaults: ``decay=0.9``, ``nesterov=False``, ``dampening=0.0``, ``accumulator_dtype=None`` (the
    buffer is stored in each parameter's dtype; arithmetic is done in float32 or wider and rounded
    once when stored). ``decay`` is in ``[0, 1]`` and may be a schedule (a momentum schedule,
    evaluated at the step count, step 0 being the first update); ``dampening`` is in ``[0, 1]``.

    torch: ``SGD(momentum=μ, dampening=τ, nesterov=...)`` keeps exactly this buffer, including the
    first-step rule ``b_1 = g_1`` that ignores dampening (so a dampened buffer is *not*
    ``(1-τ)·g_1`` after the first step). torch rejects ``nesterov=True`` with ``dampening != 0``;
    gradtx allows the combination (the formula above is well defined).
    Optax: ``optax.trace(decay, nesterov, accumulator_dtype)`` is the ``τ = 0`` case (where the
    first-step rule changes nothing, since ``μ·0 + g = g``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.trace(decay=0.5)
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
        >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
        >>> u.tolist(), int(state.count)
        ([1.5, 3.0], 2)
    """

    decay: Any = hyperparameter(0.9, low=0.0, high=1.0, schedule=True)
    nesterov: bool = option(False, kind="bool")
    dampening: float = hyperparameter(0.0, low=0.0, high=1.0)
    accumulator_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return TraceState(numerics.init_count(), zeros_like(params, self.accumulator_dtype))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        decay = numerics.value_at(self.decay, state.count)
        keep = 1.0 - numerics.value_at(self.dampening, state.count)
        first = state.count == 0

        def one(g, b):
            ct = numerics.compute_dtype(g.dtype)
            g32 = numerics.as_compute(g)
            mu = decay.astype(ct)
            new_b = numerics.as_stored(
                jnp.where(first, g32, mu * b.astype(ct) + keep.astype(ct) * g32), b.dtype)
            out = g32 + mu * new_b if self.nesterov else new_b
            return out.astype(g.dtype), new_b.astype(b.dtype)

        out, new_trace = map_leaves(self.name, one, updates, state.trace, names=("trace",),
                                    outputs=2, update_from_old_state=True)
        return out, TraceState(numerics.safe_increment(state.count), new_trace)


@transform
class ema(Transform):
    """Exponential moving average of the updates, optionally debiased.

    With decay ``d``::

        m_t = d · m_{t-1} + (1 - d) · g_t,   m_0 = 0
        u_t = m_t / (1 - d^t)   if debias  else  m_t

    Defaults: ``decay=0.9`` (in ``[0, 1)``), ``debias=True``, ``accumulator_dtype=None`` (``m`` is
    stored in each parameter's dtype; arithmetic in float32 or wider). The state keeps the raw
    ``m_t``; only the output is debiased. The count is kept whether or not ``debias`` is set.
    Optax: ``optax.ema(decay, debias, accumulator_dtype)`` (same definition). torch has no
    primitive; ``torch.optim.Adam``'s first moment is ``ema(b1)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.ema(decay=0.5)
        >>> state = tx.init(jnp.zeros(1))
        >>> u, state = tx.update(jnp.array([2.0]), state)
        >>> u.tolist(), state.ema.tolist()
        ([2.0], [1.0])
    """

    decay: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True)
    debias: bool = option(True, kind="bool")
    accumulator_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return EmaState(numerics.init_count(), zeros_like(params, self.accumulator_dtype))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        count = numerics.safe_increment(state.count)
        decay = numerics.value_at(self.decay, count)
        correction = numerics.bias_correction(self.decay, count)
        # Guard against 0/0 if a traced decay of 1 sneaks in (construction rejects 1.0).
        correction = jnp.where(correction > 0, correction, jnp.ones_like(correction))

        def one(g, m):
            ct = numerics.compute_dtype(g.dtype)
            d = decay.astype(ct)
            new_m = d * m.astype(ct) + (1.0 - d) * numerics.as_compute(g)
            new_m = numerics.as_stored(new_m, m.dtype)
            out = new_m / correction.astype(ct) if self.debias else new_m
            return out.astype(g.dtype), new_m.astype(m.dtype)

        # not update_from_old_state: ema follows expensive directions (Adafactor's momentum), which
        # two computations would make XLA materialise (measured 1.7x slower under the flags)
        out, new_ema = map_leaves(self.name, one, updates, state.ema, names=("ema",), outputs=2)
        return out, EmaState(count, new_ema)
