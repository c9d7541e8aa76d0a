"""Schedules: immutable, hashable, value-equal maps from a step count to a float32 value.

A schedule is called with the step of the update being computed — **step 0 is the first update**
(the count a transform's state holds before it increments) — as a Python int or a traced integer
array, and returns a float32 scalar (or an array of the step's shape). Every schedule here is a
frozen dataclass: two schedules built with equal arguments are equal and hash equal (so optimizers
built from them hit the same jit cache), and the ``repr`` reads like the call that built it.
Arguments are validated when the schedule is built (``ValueError``/``TypeError`` naming the schedule,
the argument, the value and the valid range). Negative steps are treated as step 0.

Use a schedule wherever a transform accepts one (a learning rate, a weight decay rate, a momentum)::

    tx = gradtx.scale_by_learning_rate(gradtx.schedules.warmup_cosine(
        peak_value=1e-3, warmup_steps=1_000, decay_steps_after_warmup=99_000))

**Step-count convention.** Every length argument is the length of *one* phase and never includes
another phase; names say which phase (``warmup_steps``, ``decay_steps_after_warmup``,
``stable_steps``). Optax's ``warmup_cosine_decay_schedule(decay_steps=T)`` counts the warm-up inside
``T``: it is ``warmup_cosine(warmup_steps=W, decay_steps_after_warmup=T - W)`` here. Keras'
``CosineDecay(decay_steps=D, warmup_steps=W)`` excludes the warm-up, as gradtx does. torch builds
the same curve as ``SequentialLR([LinearLR(...), CosineAnnealingLR(T_max=D)], milestones=[W])``.

**Precision.** Values are computed in float32 (float64 when ``jax_enable_x64`` is on) and returned
as float32. The formulas avoid cancellation (phase fractions are formed from exact integer
differences; ``1 + cos`` is evaluated as a squared half-angle cosine), so most schedules are within
a few float32 ulps of the exact value; powers with large exponents (``exponential``, ``step_decay``)
carry the float32 ``pow`` error, about ``|log(value / init_value)| · 6e-8`` relative. Under x64 every
schedule is the float32 rounding of a float64 evaluation.

:func:`from_torch` builds the schedule that reproduces a ``torch.optim.lr_scheduler`` scheduler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _validate
from gradtx.base import Declared, hyperparameter, option

__all__ = [
    "Schedule", "constant", "linear", "polynomial", "exponential", "piecewise_constant",
    "step_decay", "multistep", "cosine", "warmup_cosine", "warmup_linear", "inverse_sqrt",
    "warmup_stable_decay", "one_cycle", "cyclic", "sgdr", "join", "from_torch",
]

_INT_MAX = 2 ** 31 - 1
_HALF_INT = 2 ** 30  # periodic schedules form 2·period in int32


def _schedule(cls):
    return dataclasses.dataclass(frozen=True, repr=False, eq=True)(cls)


def _steps(default=dataclasses.MISSING, *, low=0):
    """A step-count argument: an int in [low, 2**30]."""
    return hyperparameter(default, low=low, high=_HALF_INT, integer=True)


def _static(x) -> bool:
    """True when ``x`` is a concrete number (not a tracer) that cross-field checks may compare."""
    return not _validate.is_traced(x)


class Schedule(Declared):
    """Base class of the gradtx schedules: a frozen dataclass mapping a step to a float32 value.

    Subclasses declare their arguments with :func:`gradtx.hyperparameter` / :func:`gradtx.option`
    (validated at construction exactly as transform hyperparameters are), may add cross-field
    rules in ``_check``, and implement ``_value(t, dtype)``: the value at the non-negative integer
    array ``t`` computed in ``dtype``, using only ``jnp`` operations (no Python branching on ``t``),
    so a schedule works under ``jit``, ``vmap`` and ``grad`` of a training step.

    Calling a schedule accepts a Python int or an integer array (traced or not; float steps are
    truncated to int32) and returns a float32 array of the step's shape.

    Example:
        >>> import jax, gradtx
        >>> s = gradtx.schedules.linear(init_value=1.0, end_value=0.0, transition_steps=4)
        >>> s
        linear(init_value=1.0, end_value=0.0, transition_steps=4)
        >>> s(1).tolist(), jax.jit(s)(2).tolist(), s(10).dtype.name
        (0.75, 0.5, 'float32')
        >>> s == gradtx.schedules.linear(1.0, 0.0, 4), hash(s) == hash(gradtx.schedules.linear(1.0, 0.0, 4))
        (True, True)
    """

    def __call__(self, step) -> jax.Array:
        t = jnp.asarray(step)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            t = t.astype(jnp.int32)
        try:
            hash(self)
        except TypeError:  # traced hyperparameters (inside inject_hyperparams): evaluate inline
            return _evaluate(self, t)
        # one compiled program per (schedule, step shape/dtype): a schedule called eagerly gives
        # bit-for-bit the value it gives inside a jitted training step
        return _evaluate_jit(self, t)

    def _value(self, t: jax.Array, dtype) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


def _evaluate(schedule: Schedule, t: jax.Array) -> jax.Array:
    t = jnp.maximum(t, jnp.zeros((), t.dtype))
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.asarray(schedule._value(t, dtype)).astype(jnp.float32)


_evaluate_jit = jax.jit(_evaluate, static_argnums=0)




# ----------------------------------------------------------------------------- numeric helpers

def _f(x, dtype) -> jax.Array:
    """A (possibly traced) hyperparameter as a ``dtype`` array."""
    return jnp.asarray(x).astype(dtype)


def _i(x, t: jax.Array) -> jax.Array:
    """A (possibly traced) step-count hyperparameter as an integer array of ``t``'s dtype."""
    return jnp.asarray(x).astype(t.dtype)


def _ratio(num: jax.Array, den: jax.Array, dtype) -> jax.Array:
    """``num / den`` for integer arrays, rounded once; 1 where ``den == 0``.

    ``num == den`` gives exactly 1 and ``num == 0`` exactly 0: for a constant ``den`` XLA computes
    ``num * (1/den)``, which is not correctly rounded (``5 * (1/5) != 1`` in float32), and a phase
    must end exactly on its end value.
    """
    den_safe = jnp.where(den > 0, den, jnp.ones_like(den))
    ratio = num.astype(dtype) / den_safe.astype(dtype)
    ratio = jnp.where(num == den, jnp.ones((), dtype), ratio)
    ratio = jnp.where(num == 0, jnp.zeros((), dtype), ratio)
    return jnp.where(den > 0, ratio, jnp.ones((), dtype))


def _pow(base, x: jax.Array, dtype) -> jax.Array:
    """``base ** x`` for a hyperparameter ``base >= 0`` and a non-negative exponent array ``x``.

    A concrete ``base`` has its logarithm taken in float64 on the host, so ``exp(x · log base)``
    carries only the rounding of ``log base`` (relative), not that of ``base`` itself (which, raised
    to a large power, would cost ``x`` ulps for ``base`` close to 1).
    """
    if _validate.is_traced(base):
        return jnp.power(_f(base, dtype), x)
    if base == 0:
        return jnp.where(x == 0, jnp.ones((), dtype), jnp.zeros((), dtype))
    return jnp.exp(x * _f(math.log(base), dtype))


def _linear_weights(r: jax.Array, n: jax.Array, dtype):
    """For ``0 <= r <= n`` integers: ``((n - r)/n, r/n)``, each from an exact integer numerator."""
    return _ratio(n - r, n, dtype), _ratio(r, n, dtype)


def _half_cos_sq(u: jax.Array, v: jax.Array):
    """``((1 + cos πx)/2, (1 - cos πx)/2)`` for ``x = u/(u+v)`` given ``u = x`` and ``v = 1 - x``.

    Both are squares of a half-angle sine/cosine whose argument is at most π/4, evaluated from
    whichever of ``u`` and ``v`` is small, so neither weight suffers cancellation near 0 or 1.
    """
    half = math.pi / 2
    small = u <= v
    cos_v = jnp.where(small, jnp.cos(half * u), jnp.sin(half * v))
    sin_v = jnp.where(small, jnp.sin(half * u), jnp.cos(half * v))
    return cos_v * cos_v, sin_v * sin_v


def _mix(a, wa, b, wb):
    """``a·wa + b·wb`` for weights summing to 1, kept between ``a`` and ``b``.

    Both weights are non-negative (no cancellation for same-sign ``a``, ``b``); the result is clamped
    to ``[min(a, b), max(a, b)]`` and is exactly ``a`` when ``a == b``, so rounding can never push a
    schedule past its end value or make a constant phase wobble.
    """
    mixed = jnp.clip(a * wa + b * wb, jnp.minimum(a, b), jnp.maximum(a, b))
    return jnp.where(a == b, a, mixed)


def _cosine_weights(r, n, dtype, exponent=1.0):
    """Weights ``(c^e, 1 - c^e)`` with ``c = (1 + cos(π r/n))/2`` for integers ``0 <= r <= n``."""
    u, v = _ratio(r, n, dtype), _ratio(n - r, n, dtype)
    c, s = _half_cos_sq(u, v)
    e = _f(exponent, dtype)
    one = jnp.ones((), dtype)
    is_one = e == one
    e_safe = jnp.where(is_one, one, e)
    c_pow = jnp.power(c, e_safe)
    complement = -jnp.expm1(e_safe * jnp.log1p(-jnp.minimum(s, one)))
    return jnp.where(is_one, c, c_pow), jnp.where(is_one, s, complement)


def _warmup(t, warmup, init, peak, dtype):
    """Linear warm-up value ``init + (peak - init)·t/W`` (valid for ``t <= W``)."""
    w = _i(warmup, t)
    a, b = _linear_weights(jnp.minimum(t, w), w, dtype)
    return _mix(_f(init, dtype), a, _f(peak, dtype), b)


# ----------------------------------------------------------------------------- basic schedules

@_schedule
class constant(Schedule):
    """The constant schedule ``η(t) = value``.

    Optax: ``optax.constant_schedule(value)``; torch: no scheduler.

    Example:
        >>> import gradtx
        >>> gradtx.schedules.constant(0.5)(7).tolist()
        0.5
    """

    value: float = hyperparameter()

    def _value(self, t, dtype):
        return jnp.broadcast_to(_f(self.value, dtype), t.shape)


@_schedule
class linear(Schedule):
    """Linear interpolation from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    ``η(t) = init_value + (end_value - init_value) · clip((t - transition_begin) / transition_steps, 0, 1)``:
    ``init_value`` up to step ``transition_begin``, ``end_value`` from step
    ``transition_begin + transition_steps`` on. ``transition_steps >= 1``, ``transition_begin >= 0``.
    Optax: ``optax.linear_schedule`` (same arguments). torch:
    ``LinearLR(start_factor=init/lr, end_factor=end/lr, total_iters=transition_steps)``.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.linear(1.0, 0.5, transition_steps=2, transition_begin=1)
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 1.0, 0.75, 0.5, 0.5]
    """

    init_value: float = hyperparameter()
    end_value: float = hyperparameter()
    transition_steps: int = _steps(low=1)
    transition_begin: int = _steps(0)

    def _value(self, t, dtype):
        n = _i(self.transition_steps, t)
        r = jnp.clip(t - _i(self.transition_begin, t), 0, n)
        a, b = _linear_weights(r, n, dtype)
        return _mix(_f(self.init_value, dtype), a, _f(self.end_value, dtype), b)


@_schedule
class polynomial(Schedule):
    """Polynomial decay ``η = end + (init - end) · (1 - r/n)^power``, ``r = clip(t - begin, 0, n)``.

    ``n = transition_steps >= 1``, ``power > 0`` (``power = 1`` is :class:`linear`). Holds
    ``init_value`` before ``transition_begin`` and ``end_value`` after the transition.
    Optax: ``optax.polynomial_schedule`` (same arguments). torch:
    ``PolynomialLR(total_iters=n, power=p)`` is ``polynomial(lr, 0.0, p, n)``.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.polynomial(1.0, 0.0, power=2.0, transition_steps=2)
        >>> [s(t).tolist() for t in range(4)]
        [1.0, 0.25, 0.0, 0.0]
    """

    init_value: float = hyperparameter()
    end_value: float = hyperparameter()
    power: float = hyperparameter(low=0.0, low_open=True)
    transition_steps: int = _steps(low=1)
    transition_begin: int = _steps(0)

    def _value(self, t, dtype):
        n = _i(self.transition_steps, t)
        r = jnp.clip(t - _i(self.transition_begin, t), 0, n)
        p = _f(self.power, dtype)
        remaining = _ratio(n - r, n, dtype)
        w = jnp.power(remaining, p)
        frac = _ratio(r, n, dtype)
        one = jnp.ones((), dtype)
        w_end = -jnp.expm1(p * jnp.log1p(-jnp.minimum(frac, one)))
        return _mix(_f(self.init_value, dtype), w, _f(self.end_value, dtype), w_end)


@_schedule
class exponential(Schedule):
    """Exponential decay ``η = init_value · decay_rate^((t - transition_begin) / transition_steps)``.

    ``init_value`` until ``transition_begin``; with ``staircase=True`` the exponent is floored (the
    value changes every ``transition_steps`` steps). ``end_value``, if given, bounds the value: a
    lower bound when ``decay_rate < 1``, an upper bound when ``decay_rate > 1`` (where it is
    required: an uncapped growth would overflow to inf).
    ``decay_rate > 0``, ``transition_steps >= 1``. Optax: ``optax.exponential_decay`` (same
    arguments). torch: ``ExponentialLR(gamma)`` is ``exponential(lr, gamma)`` (``transition_steps=1``).

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.exponential(1.0, decay_rate=0.5, transition_steps=2, staircase=True)
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
        >>> gradtx.schedules.exponential(1.0, 0.5, end_value=0.25)(10).tolist()
        0.25
    """

    init_value: float = hyperparameter()
    decay_rate: float = hyperparameter(low=0.0, low_open=True)
    transition_steps: int = _steps(1, low=1)
    transition_begin: int = _steps(0)
    staircase: bool = option(False, kind="bool")
    end_value: float | None = hyperparameter(None, allow_none=True)

    def _check(self):
        if (self.end_value is None and _static(self.decay_rate) and _static(self.init_value)
                and self.decay_rate > 1 and self.init_value != 0):
            raise ValueError(
                f"exponential: decay_rate={self.decay_rate!r} > 1 grows without bound and would "
                f"overflow float32 to inf; give end_value (the cap the value stops at), or "
                f"decay_rate <= 1.")
        if (self.end_value is not None and _static(self.end_value) and _static(self.init_value)
                and _static(self.decay_rate)):
            if self.decay_rate < 1 and self.end_value > self.init_value:
                raise ValueError(
                    f"exponential: end_value={self.end_value!r} is above init_value="
                    f"{self.init_value!r} but decay_rate={self.decay_rate!r} < 1 decays; expected "
                    f"end_value <= init_value (or decay_rate > 1 to grow).")
            if self.decay_rate > 1 and self.end_value < self.init_value:
                raise ValueError(
                    f"exponential: end_value={self.end_value!r} is below init_value="
                    f"{self.init_value!r} but decay_rate={self.decay_rate!r} > 1 grows; expected "
                    f"end_value >= init_value (or decay_rate < 1 to decay).")

    def _value(self, t, dtype):
        n = _i(self.transition_steps, t)
        r = jnp.maximum(t - _i(self.transition_begin, t), 0)
        if self.staircase:
            x = (r // n).astype(dtype)
        else:
            x = r.astype(dtype) / n.astype(dtype)
        rate = _f(self.decay_rate, dtype)
        value = _f(self.init_value, dtype) * _pow(self.decay_rate, x, dtype)
        if self.end_value is not None:
            end = _f(self.end_value, dtype)
            value = jnp.where(rate < 1, jnp.maximum(value, end), jnp.minimum(value, end))
        return value


def _check_int_tuple(owner, name, values, *, strict: bool, low: int = 0):
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"{owner}: {name}={values!r} must be a tuple of ints.")
    out = tuple(_validate.check_number(owner, f"{name}[{i}]", v, low=low, high=_INT_MAX,
                                       integer=True) for i, v in enumerate(values))
    for a, b in zip(out, out[1:]):
        if b < a or (strict and b == a):
            order = "strictly increasing" if strict else "non-decreasing"
            raise ValueError(f"{owner}: {name}={out!r} must be {order}.")
    return out


@_schedule
class piecewise_constant(Schedule):
    """Absolute values that change at step boundaries: ``η(t) = values[k]``, ``k = #{b in boundaries : b <= t}``.

    ``values`` has one more entry than ``boundaries``; ``boundaries`` are strictly increasing
    non-negative ints, and ``values[k]`` takes effect *at* step ``boundaries[k-1]``. Keras'
    ``PiecewiseConstantDecay`` switches one step later (its boundary ``b`` is ``b + 1`` here); Optax's
    ``piecewise_constant_schedule`` takes multiplicative scales instead of values. torch:
    ``ConstantLR(factor, total_iters)`` is ``piecewise_constant((factor·lr, lr), (total_iters,))``.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.piecewise_constant(values=(1.0, 0.5, 0.25), boundaries=(2, 3))
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 1.0, 0.5, 0.25, 0.25]
    """

    values: tuple = option(kind="any")
    boundaries: tuple = option((), kind="any")

    def _check(self):
        owner = "piecewise_constant"
        if not isinstance(self.values, (tuple, list)) or not self.values:
            raise TypeError(f"{owner}: values={self.values!r} must be a non-empty tuple of numbers.")
        values = tuple(_validate.check_number(owner, f"values[{i}]", v)
                       for i, v in enumerate(self.values))
        boundaries = _check_int_tuple(owner, "boundaries", self.boundaries, strict=True)
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"{owner}: got {len(values)} values and {len(boundaries)} boundaries; "
                             f"expected len(values) == len(boundaries) + 1.")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "boundaries", boundaries)

    def _value(self, t, dtype):
        value = jnp.broadcast_to(_f(self.values[0], dtype), t.shape)
        for b, v in zip(self.boundaries, self.values[1:]):
            value = jnp.where(t >= b, _f(v, dtype), value)
        return value


@_schedule
class step_decay(Schedule):
    """Step decay ``η(t) = init_value · factor^⌊t / step_size⌋``.

    ``step_size >= 1``, ``factor >= 0`` (default 0.1, torch's). torch: ``StepLR(step_size, gamma)``
    is ``step_decay(lr, step_size, gamma)``; Optax: ``exponential_decay(..., staircase=True)``.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.step_decay(1.0, step_size=2, factor=0.5)
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    init_value: float = hyperparameter()
    step_size: int = _steps(low=1)
    factor: float = hyperparameter(0.1, low=0.0)

    def _value(self, t, dtype):
        k = (t // _i(self.step_size, t)).astype(dtype)
        return _f(self.init_value, dtype) * _pow(self.factor, k, dtype)


@_schedule
class multistep(Schedule):
    """Decay by ``factor`` at each milestone: ``η(t) = init_value · factor^#{m in milestones : m <= t}``.

    ``milestones`` is a non-decreasing tuple of non-negative ints (a repeated milestone applies the
    factor once per repetition, as torch does); ``factor >= 0`` (default 0.1). torch:
    ``MultiStepLR(milestones, gamma)``; Optax: ``piecewise_constant_schedule`` with equal scales.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.multistep(1.0, milestones=(1, 3), factor=0.5)
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 0.5, 0.5, 0.25, 0.25]
    """

    init_value: float = hyperparameter()
    milestones: tuple = option(kind="any")
    factor: float = hyperparameter(0.1, low=0.0)

    def _check(self):
        object.__setattr__(self, "milestones",
                           _check_int_tuple("multistep", "milestones", self.milestones, strict=False))

    def _value(self, t, dtype):
        k = jnp.zeros(t.shape, t.dtype)
        for m in self.milestones:
            k = k + (t >= m).astype(t.dtype)
        return _f(self.init_value, dtype) * _pow(self.factor, k.astype(dtype), dtype)


@_schedule
class cosine(Schedule):
    """Cosine decay from ``init_value`` to ``end_value`` over ``decay_steps`` steps.

    ``η(t) = end + (init - end) · c(t)^exponent`` with ``c(t) = ½(1 + cos(π·min(t, T)/T))``,
    ``T = decay_steps >= 1``, so ``η(0) = init`` and ``η(t) = end`` for ``t >= T``. With
    ``periodic=True`` the cosine continues past ``T`` instead of holding ``end`` (it climbs back to
    ``init`` at ``2T``, with period ``2T``), which is what torch's ``CosineAnnealingLR`` does when
    stepped past ``T_max``. Optax: ``cosine_decay_schedule(init_value, decay_steps, alpha, exponent)``
    is ``cosine(init_value, decay_steps, end_value=alpha·init_value, exponent=exponent)``. torch:
    ``CosineAnnealingLR(T_max, eta_min)`` is ``cosine(lr, T_max, eta_min, periodic=True)``.

    Example:
        >>> import gradtx
        >>> import numpy as np, gradtx
        >>> s = gradtx.schedules.cosine(1.0, decay_steps=2)
        >>> np.round([s(t) for t in range(4)], 6).tolist()
        [1.0, 0.5, 0.0, 0.0]
        >>> p = gradtx.schedules.cosine(1.0, decay_steps=2, periodic=True)
        >>> np.round([p(t) for t in range(5)], 6).tolist()
        [1.0, 0.5, 0.0, 0.5, 1.0]
    """

    init_value: float = hyperparameter()
    decay_steps: int = _steps(low=1)
    end_value: float = hyperparameter(0.0)
    exponent: float = hyperparameter(1.0, low=0.0, low_open=True)
    periodic: bool = option(False, kind="bool")

    def _value(self, t, dtype):
        n = _i(self.decay_steps, t)
        if self.periodic:
            r = t % (2 * n)
            d = jnp.where(r <= n, r, 2 * n - r)
        else:
            d = jnp.minimum(t, n)
        w, w_end = _cosine_weights(d, n, dtype, self.exponent)
        return _mix(_f(self.init_value, dtype), w, _f(self.end_value, dtype), w_end)


@_schedule
class warmup_cosine(Schedule):
    """Linear warm-up to ``peak_value``, then cosine decay to ``end_value``.

    For ``t < W``: ``η = init + (peak - init)·t/W``; for ``W <= t <= W + D``:
    ``η = end + (peak - end)·½(1 + cos(π (t - W)/D))``; after ``W + D``: ``end``. ``W = warmup_steps``
    (``>= 0``; 0 means no warm-up) and ``D = decay_steps_after_warmup`` (``>= 1``) is the length of
    the cosine phase alone; the schedule reaches ``end_value`` at step ``W + D``. ``exponent``
    raises the cosine factor as in :class:`cosine`.

    Conventions elsewhere: Optax ``warmup_cosine_decay_schedule(init, peak, W, decay_steps=T, end)``
    counts the warm-up in ``T``: use ``decay_steps_after_warmup=T - W``. Keras
    ``CosineDecay(initial_learning_rate=init, decay_steps=D, alpha, warmup_target=peak,
    warmup_steps=W)`` excludes it: ``decay_steps_after_warmup=D``, ``end_value=alpha·peak``. torch:
    ``SequentialLR([LinearLR(start_factor=init/peak, total_iters=W), CosineAnnealingLR(T_max=D,
    eta_min=end)], milestones=[W])`` with ``lr=peak``.

    Example:
        >>> import gradtx
        >>> import numpy as np, gradtx
        >>> s = gradtx.schedules.warmup_cosine(1.0, warmup_steps=2, decay_steps_after_warmup=2)
        >>> np.round([s(t) for t in range(6)], 6).tolist()
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """

    peak_value: float = hyperparameter()
    warmup_steps: int = _steps()
    decay_steps_after_warmup: int = _steps(low=1)
    init_value: float = hyperparameter(0.0)
    end_value: float = hyperparameter(0.0)
    exponent: float = hyperparameter(1.0, low=0.0, low_open=True)

    def _value(self, t, dtype):
        w = _i(self.warmup_steps, t)
        n = _i(self.decay_steps_after_warmup, t)
        warm = _warmup(t, w, self.init_value, self.peak_value, dtype)
        c, c_end = _cosine_weights(jnp.clip(t - w, 0, n), n, dtype, self.exponent)
        decay = _mix(_f(self.peak_value, dtype), c, _f(self.end_value, dtype), c_end)
        return jnp.where(t < w, warm, decay)


@_schedule
class warmup_linear(Schedule):
    """Linear warm-up to ``peak_value`` over ``warmup_steps``, then linear decay to ``end_value``.

    For ``t < W``: ``η = init + (peak - init)·t/W``; for ``W <= t``:
    ``η = peak + (end - peak)·min(t - W, D)/D`` with ``D = decay_steps_after_warmup >= 1`` the length
    of the decay phase alone (``end_value`` is reached at step ``W + D``). The BERT/Hugging Face
    "linear schedule with warm-up" with ``num_training_steps = N`` is ``D = N - W``. torch:
    ``SequentialLR([LinearLR(init/peak, 1.0, W), LinearLR(1.0, end/peak, D)], [W])``.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.warmup_linear(1.0, warmup_steps=2, decay_steps_after_warmup=4)
        >>> [s(t).tolist() for t in range(8)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """

    peak_value: float = hyperparameter()
    warmup_steps: int = _steps()
    decay_steps_after_warmup: int = _steps(low=1)
    init_value: float = hyperparameter(0.0)
    end_value: float = hyperparameter(0.0)

    def _value(self, t, dtype):
        w = _i(self.warmup_steps, t)
        n = _i(self.decay_steps_after_warmup, t)
        warm = _warmup(t, w, self.init_value, self.peak_value, dtype)
        a, b = _linear_weights(jnp.clip(t - w, 0, n), n, dtype)
        decay = _mix(_f(self.peak_value, dtype), a, _f(self.end_value, dtype), b)
        return jnp.where(t < w, warm, decay)


@_schedule
class inverse_sqrt(Schedule):
    """Linear warm-up, then inverse-square-root decay: ``η = peak / sqrt(1 + (t - W)/timescale)``.

    For ``t < W = warmup_steps``: ``η = init + (peak - init)·t/W``; from ``t = W`` (where it equals
    ``peak_value``) it decays like ``1/sqrt(t)``. ``timescale`` (``> 0``) sets how fast; the default
    ``None`` uses ``max(W, 1)``, which gives ``η = peak·sqrt(W/t)`` for ``t >= W`` — the
    "rsqrt" schedule of T5 and, with ``peak = d_model^-0.5·W^-0.5``, the Transformer (Noam)
    schedule shifted by one step (Noam counts steps from 1).

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.inverse_sqrt(1.0, warmup_steps=4)
        >>> [s(t).tolist() for t in (0, 2, 4, 16)]
        [0.0, 0.5, 1.0, 0.5]
    """

    peak_value: float = hyperparameter()
    warmup_steps: int = _steps(0)
    timescale: float | None = hyperparameter(None, low=0.0, low_open=True, allow_none=True)
    init_value: float = hyperparameter(0.0)

    def _value(self, t, dtype):
        w = _i(self.warmup_steps, t)
        warm = _warmup(t, w, self.init_value, self.peak_value, dtype)
        if self.timescale is None:
            tau = jnp.maximum(w, jnp.ones((), t.dtype)).astype(dtype)
        else:
            tau = _f(self.timescale, dtype)
        k = jnp.maximum(t - w, 0).astype(dtype)
        decay = _f(self.peak_value, dtype) * jax.lax.rsqrt((tau + k) / tau)
        return jnp.where(t < w, warm, decay)


@_schedule
class warmup_stable_decay(Schedule):
    """Warm-up, stable, decay (WSD): linear warm-up, a constant phase at ``peak_value``, a decay.

    Phases, each counted on its own: ``warmup_steps`` (``init → peak``, linear), ``stable_steps``
    (``peak``), ``decay_steps_after_stable`` (``>= 1``; ``peak → end``) — ``end_value`` is reached at
    step ``warmup_steps + stable_steps + decay_steps_after_stable`` and held after. ``decay_shape``:
    ``"linear"`` (``1 - f``), ``"cosine"`` (``½(1 + cos πf)``) or ``"sqrt"`` (``1 - √f``, Hägele et al.
    2024), ``f`` the fraction of the decay phase done. Optax has no WSD schedule; torch:
    ``SequentialLR([LinearLR, ConstantLR(factor=1), LinearLR], milestones)`` for the linear shape.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.warmup_stable_decay(1.0, warmup_steps=1, stable_steps=2,
        ...                                          decay_steps_after_stable=2)
        >>> [s(t).tolist() for t in range(7)]
        [0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    """

    peak_value: float = hyperparameter()
    warmup_steps: int = _steps()
    stable_steps: int = _steps()
    decay_steps_after_stable: int = _steps(low=1)
    init_value: float = hyperparameter(0.0)
    end_value: float = hyperparameter(0.0)
    decay_shape: str = option("linear", choices=("linear", "cosine", "sqrt"))

    def _value(self, t, dtype):
        w = _i(self.warmup_steps, t)
        start = w + _i(self.stable_steps, t)
        n = _i(self.decay_steps_after_stable, t)
        warm = _warmup(t, w, self.init_value, self.peak_value, dtype)
        r = jnp.clip(t - start, 0, n)
        if self.decay_shape == "linear":
            a, b = _linear_weights(r, n, dtype)
        elif self.decay_shape == "cosine":
            a, b = _cosine_weights(r, n, dtype)
        else:
            f = _ratio(r, n, dtype)
            sq = jnp.sqrt(f)
            a = _ratio(n - r, n, dtype) / (1 + sq)
            b = sq
        decay = _mix(_f(self.peak_value, dtype), a, _f(self.end_value, dtype), b)
        return jnp.where(t < w, warm, decay)


@_schedule
class one_cycle(Schedule):
    """The 1cycle policy (Smith & Topin 2018) exactly as torch's ``OneCycleLR`` computes it.

    ``init = peak_value / div_factor``, ``final = init / final_div_factor``, ``T = total_steps``.
    Two phases (default): ``init → peak`` on steps ``[0, e₁]``, ``peak → final`` on ``[e₁, T-1]``,
    with ``e₁ = pct_start·T - 1`` (torch's boundary, not necessarily an integer). With
    ``three_phase=True``: ``init → peak`` on ``[0, e₁]``, ``peak → init`` on ``[e₁, e₂]``,
    ``e₂ = 2·pct_start·T - 2``, then ``init → final`` on ``[e₂, T-1]``. Within a phase from ``a`` to
    ``b`` at fraction ``f``: ``anneal="cos"``: ``b + (a - b)·½(1 + cos πf)``; ``"linear"``:
    ``a + (b - a)·f``. From step ``T-1`` on the value stays ``final`` (torch raises after step ``T``;
    at step ``T`` it extrapolates one step past its end, which gradtx does not).
    Defaults are torch's: ``pct_start=0.3``, ``div_factor=25``, ``final_div_factor=1e4``, cosine.
    Optax: ``cosine_onecycle_schedule`` / ``linear_onecycle_schedule`` place the phase boundary at
    ``int(pct_start·T)`` instead. Momentum cycling is not part of a learning-rate schedule: build a
    second ``one_cycle`` for it if needed.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.one_cycle(1.0, total_steps=5, pct_start=0.6, div_factor=4.0,
        ...                                final_div_factor=2.0, anneal="linear")
        >>> [s(t).tolist() for t in range(6)]
        [0.25, 0.625, 1.0, 0.5625, 0.125, 0.125]
    """

    peak_value: float = hyperparameter()
    total_steps: int = _steps(low=1)
    pct_start: float = hyperparameter(0.3, low=0.0, high=1.0)
    div_factor: float = hyperparameter(25.0, low=0.0, low_open=True)
    final_div_factor: float = hyperparameter(1e4, low=0.0, low_open=True)
    anneal: str = option("cos", choices=("cos", "linear"))
    three_phase: bool = option(False, kind="bool")

    def _check(self):
        if _static(self.pct_start) and _static(self.total_steps) \
                and self.pct_start * self.total_steps <= 1:
            raise ValueError(
                f"one_cycle: pct_start={self.pct_start!r} with total_steps={self.total_steps!r} "
                f"leaves the warm-up phase no step (pct_start·total_steps must be > 1; torch's "
                f"OneCycleLR divides by zero there); raise pct_start or total_steps.")

    def _value(self, t, dtype):
        peak = _f(self.peak_value, dtype)
        if all(map(_static, (self.peak_value, self.div_factor, self.final_div_factor))):
            # torch divides in float64: round init and final once, as it does
            init = _f(self.peak_value / self.div_factor, dtype)
            final = _f(self.peak_value / self.div_factor / self.final_div_factor, dtype)
        else:
            init = peak / _f(self.div_factor, dtype)
            final = init / _f(self.final_div_factor, dtype)
        s_int = jnp.minimum(t, _i(self.total_steps, t) - 1)
        if _static(self.pct_start) and _static(self.total_steps):
            # torch forms the (possibly fractional) boundaries in float64; keep their integer
            # parts exact so distances to them are not spoiled by float32 rounding
            n, pct = self.total_steps, self.pct_start
            bounds = [float(pct * n) - 1, float(2 * pct * n) - 2, float(n - 1)]

            def split(b):
                whole = math.floor(b)
                return jnp.asarray(whole).astype(t.dtype), _f(b - whole, dtype)

            def dist(a, b):  # b - a for boundaries/steps given as (int part, fraction)
                return (b[0] - a[0]).astype(dtype) + (b[1] - a[1])

            s_pt = (s_int, jnp.zeros((), dtype))
            pts = [split(b) for b in bounds]
            zero = (jnp.zeros((), t.dtype), jnp.zeros((), dtype))
        else:
            total = _f(self.total_steps, dtype)
            pct = _f(self.pct_start, dtype)
            pts = [pct * total - 1, 2 * pct * total - 2, total - 1]

            def dist(a, b):
                return b - a

            s_pt = s_int.astype(dtype)
            zero = jnp.zeros((), dtype)
        e1, e2, last = pts
        if self.three_phase:
            phases = [(e1, init, peak), (e2, peak, init), (last, init, final)]
        else:
            phases = [(e1, init, peak), (last, peak, final)]
        value = None
        start = zero
        for end, a, b in phases:
            den = dist(start, end)
            ok = den > 0
            den_safe = jnp.where(ok, den, jnp.ones((), dtype))
            u = jnp.where(ok, dist(start, s_pt) / den_safe, jnp.ones((), dtype))
            v = jnp.where(ok, dist(s_pt, end) / den_safe, jnp.zeros((), dtype))
            if self.anneal == "cos":
                wa, wb = _half_cos_sq(u, v)
            else:
                wa, wb = v, u
            phase_value = _mix(a, wa, b, wb)
            # exactly on a phase boundary the value is exactly that boundary's value
            phase_value = jnp.where(v == 0, b, jnp.where(u == 0, a, phase_value))
            # torch picks the first phase whose end is >= step: step <= start -> earlier phase
            value = phase_value if value is None else jnp.where(dist(s_pt, start) >= 0, value,
                                                                 phase_value)
            start = end
        return value


@_schedule
class cyclic(Schedule):
    """Cyclical learning rates (Smith 2017), as torch's ``CyclicLR``.

    A triangle between ``base_value`` and ``max_value``: ``step_size_up`` steps up, then
    ``step_size_down`` steps down (default: equal to ``step_size_up``), repeating. With ``r = t mod
    (up + down)`` the triangle height is ``h = r/up`` for ``r <= up`` else ``(up + down - r)/down``, and
    ``η = base + (max - base)·h·a`` with the amplitude ``a``: ``mode="triangular"``: 1;
    ``"triangular2"``: halved each cycle, ``2^-(cycle-1)`` with ``cycle = ⌊t/(up+down)⌋ + 1``;
    ``"exp_range"``: ``gamma^t``. torch's default ``step_size_up`` is 2000 (here it is required);
    its momentum cycling and custom ``scale_fn`` are not part of this schedule.

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.cyclic(0.0, 1.0, step_size_up=2, mode="triangular2")
        >>> [s(t).tolist() for t in range(9)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.25, 0.5, 0.25, 0.0]
    """

    base_value: float = hyperparameter()
    max_value: float = hyperparameter()
    step_size_up: int = _steps(low=1)
    step_size_down: int | None = hyperparameter(None, low=0, high=_HALF_INT, integer=True,
                                                 allow_none=True)
    mode: str = option("triangular", choices=("triangular", "triangular2", "exp_range"))
    gamma: float = hyperparameter(1.0, low=0.0, low_open=True)

    def _value(self, t, dtype):
        up = _i(self.step_size_up, t)
        down = up if self.step_size_down is None else _i(self.step_size_down, t)
        size = up + down
        r = t % size
        h = jnp.where(r <= up, _ratio(r, up, dtype), _ratio(size - r, down, dtype))
        if self.mode == "triangular":
            amp = jnp.ones((), dtype)
        elif self.mode == "triangular2":
            amp = jnp.exp2(-(t // size).astype(dtype))
        else:
            amp = _pow(self.gamma, t.astype(dtype), dtype)
        base, top = _f(self.base_value, dtype), _f(self.max_value, dtype)
        weight = h * amp
        # at the peak the value is exactly max_value (base + (max - base) may round away from it)
        return jnp.where(weight == 1, top, base + (top - base) * weight)


@_schedule
class sgdr(Schedule):
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter 2017), as torch's
    ``CosineAnnealingWarmRestarts``.

    ``η = min + (peak - min)·½(1 + cos(π T_cur / T_i))`` where ``T_cur`` counts steps since the last
    restart; the first period has ``T_0 = first_period`` steps and each restart multiplies the period
    by the integer ``period_mult`` (``T_i = T_0·period_mult^i``). At a restart the value jumps back to
    ``peak_value``. torch: ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` is
    ``sgdr(lr, T_0, T_mult, eta_min)``. Optax's ``sgdr_schedule`` takes a list of warm-up-cosine
    cycles instead: build those with :func:`join` of :class:`warmup_cosine`.

    Example:
        >>> import gradtx
        >>> import gradtx
        >>> s = gradtx.schedules.sgdr(1.0, first_period=2, period_mult=2)
        >>> [round(float(s(t)), 4) for t in range(8)]
        [1.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 1.0, 0.9619]
    """

    peak_value: float = hyperparameter()
    first_period: int = option(kind="any")
    period_mult: int = option(1, kind="any")
    min_value: float = hyperparameter(0.0)

    def _check(self):
        p = _validate.check_number("sgdr", "first_period", self.first_period, low=1,
                                   high=_HALF_INT, integer=True)
        m = _validate.check_number("sgdr", "period_mult", self.period_mult, low=1, high=1024,
                                   integer=True)
        object.__setattr__(self, "first_period", p)
        object.__setattr__(self, "period_mult", m)

    def _restarts(self):
        starts, periods = [], []
        start, period = 0, self.first_period
        while True:
            start, period = start + period, period * self.period_mult
            if start > _INT_MAX or period > _INT_MAX:
                return starts, periods
            starts.append(start)
            periods.append(period)

    def _value(self, t, dtype):
        if self.period_mult == 1:
            period = jnp.full(t.shape, self.first_period, t.dtype)
            d = t % self.first_period
        else:
            start = jnp.zeros(t.shape, t.dtype)
            period = jnp.full(t.shape, self.first_period, t.dtype)
            for s, p in zip(*self._restarts()):
                start = jnp.where(t >= s, s, start)
                period = jnp.where(t >= s, p, period)
            d = t - start
        w, w_min = _cosine_weights(d, period, dtype)
        return _mix(_f(self.peak_value, dtype), w, _f(self.min_value, dtype), w_min)


@_schedule
class join(Schedule):
    """Run schedules one after another: ``schedules[k]`` from step ``boundaries[k-1]`` on.

    ``boundaries`` are strictly increasing positive ints, one fewer than ``schedules``. Each later
    schedule sees steps counted from its own boundary: ``η(t) = schedules[k](t - boundaries[k-1])``.
    Every schedule must be hashable (all gradtx schedules are). Optax: ``join_schedules`` (same
    convention); torch: ``SequentialLR(schedulers, milestones)``.

    Example:
        >>> import numpy as np, gradtx
        >>> s = gradtx.schedules.join(
        ...     (gradtx.schedules.linear(0.0, 1.0, 2), gradtx.schedules.cosine(1.0, 2)), boundaries=(2,))
        >>> np.round([s(t) for t in range(5)], 6).tolist()
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    schedules: tuple = option(kind="any")
    boundaries: tuple = option(kind="any")

    def _check(self):
        if not isinstance(self.schedules, (tuple, list)) or not self.schedules:
            raise TypeError(f"join: schedules={self.schedules!r} must be a non-empty tuple of "
                            f"schedules.")
        for i, s in enumerate(self.schedules):
            if not callable(s):
                raise TypeError(f"join: schedules[{i}]={s!r} is not a schedule (a callable "
                                f"step -> value).")
            try:
                hash(s)
            except TypeError:
                raise TypeError(f"join: schedules[{i}]={s!r} is not hashable; use a gradtx "
                                f"schedule or a named function.") from None
        boundaries = _check_int_tuple("join", "boundaries", self.boundaries, strict=True, low=1)
        if len(boundaries) != len(self.schedules) - 1:
            raise ValueError(f"join: got {len(self.schedules)} schedules and {len(boundaries)} "
                             f"boundaries; expected len(boundaries) == len(schedules) - 1.")
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", boundaries)

    def _value(self, t, dtype):
        value = jnp.asarray(self.schedules[0](t), jnp.float32)
        for b, s in zip(self.boundaries, self.schedules[1:]):
            value = jnp.where(t >= b, jnp.asarray(s(t - b), jnp.float32), value)
        return value


# ----------------------------------------------------------------------------- torch

_TORCH_ARGS: dict[str, dict[str, Any]] = {
    "StepLR": {"step_size": dataclasses.MISSING, "gamma": 0.1},
    "MultiStepLR": {"milestones": dataclasses.MISSING, "gamma": 0.1},
    "ExponentialLR": {"gamma": dataclasses.MISSING},
    "CosineAnnealingLR": {"T_max": dataclasses.MISSING, "eta_min": 0.0},
    "CosineAnnealingWarmRestarts": {"T_0": dataclasses.MISSING, "T_mult": 1, "eta_min": 0.0},
    "OneCycleLR": {"max_lr": dataclasses.MISSING, "total_steps": None, "epochs": None,
                   "steps_per_epoch": None, "pct_start": 0.3, "anneal_strategy": "cos",
                   "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95,
                   "div_factor": 25.0, "final_div_factor": 1e4, "three_phase": False},
    "LinearLR": {"start_factor": 1.0 / 3, "end_factor": 1.0, "total_iters": 5},
    "PolynomialLR": {"total_iters": 5, "power": 1.0},
    "ConstantLR": {"factor": 1.0 / 3, "total_iters": 5},
    "CyclicLR": {"base_lr": dataclasses.MISSING, "max_lr": dataclasses.MISSING,
                 "step_size_up": 2000, "step_size_down": None, "mode": "triangular",
                 "gamma": 1.0, "scale_fn": None, "scale_mode": "cycle", "cycle_momentum": True,
                 "base_momentum": 0.8, "max_momentum": 0.9},
    "SequentialLR": {"schedulers": dataclasses.MISSING, "milestones": dataclasses.MISSING},
}


def _torch_kwargs(name: str, kwargs: dict) -> dict:
    spec = _TORCH_ARGS[name]
    kwargs = dict(kwargs)
    if kwargs.pop("last_epoch", -1) != -1:
        raise ValueError(f"from_torch: {name}: only last_epoch=-1 (a fresh scheduler) is supported; "
                         f"to resume, evaluate the schedule at the resumed step instead.")
    kwargs.pop("verbose", None)
    unknown = sorted(set(kwargs) - set(spec))
    if unknown:
        raise ValueError(f"from_torch: {name} got unknown argument(s) {unknown}; supported: "
                         f"{sorted(spec)} (and last_epoch=-1).")
    out = {}
    for key, default in spec.items():
        if key in kwargs:
            out[key] = kwargs[key]
        elif default is dataclasses.MISSING:
            raise ValueError(f"from_torch: {name} needs the argument {key!r} (torch has no "
                             f"default for it).")
        else:
            out[key] = default
    return out


def _positive_iters(name, key, value):
    return _validate.check_number(f"from_torch({name!r})", key, value, low=1, high=_HALF_INT,
                                  integer=True)


def _from_torch(name: str, lr: float, kwargs: dict) -> Schedule:
    if name not in _TORCH_ARGS:
        raise ValueError(f"from_torch: unknown scheduler {name!r}; supported: {sorted(_TORCH_ARGS)} "
                         f"(ReduceLROnPlateau is the transform gradtx.reduce_on_plateau).")
    a = _torch_kwargs(name, kwargs)
    owner = f"from_torch({name!r})"
    if name == "StepLR":
        return step_decay(lr, a["step_size"], a["gamma"])
    if name == "MultiStepLR":
        return multistep(lr, tuple(sorted(a["milestones"])), a["gamma"])
    if name == "ExponentialLR":
        return exponential(lr, a["gamma"])
    if name == "CosineAnnealingLR":
        return cosine(lr, a["T_max"], end_value=a["eta_min"], periodic=True)
    if name == "CosineAnnealingWarmRestarts":
        return sgdr(lr, a["T_0"], a["T_mult"], a["eta_min"])
    if name == "OneCycleLR":
        total = a["total_steps"]
        if total is None:
            if a["epochs"] is None or a["steps_per_epoch"] is None:
                raise ValueError(f"{owner}: give total_steps, or epochs and steps_per_epoch.")
            total = _positive_iters(name, "epochs", a["epochs"]) * _positive_iters(
                name, "steps_per_epoch", a["steps_per_epoch"])
        return one_cycle(a["max_lr"], total, a["pct_start"], a["div_factor"],
                         a["final_div_factor"], a["anneal_strategy"], a["three_phase"])
    if name == "LinearLR":
        start = _validate.check_number(owner, "start_factor", a["start_factor"], low=0.0,
                                       low_open=True, high=1.0)
        end = _validate.check_number(owner, "end_factor", a["end_factor"], low=0.0, high=1.0)
        total = _positive_iters(name, "total_iters", a["total_iters"])
        return linear(lr * start, lr * end, total)
    if name == "PolynomialLR":
        total = _positive_iters(name, "total_iters", a["total_iters"])
        power = _validate.check_number(owner, "power", a["power"], low=0.0)
        if power == 0.0:
            return constant(lr)
        return polynomial(lr, 0.0, power, total)
    if name == "ConstantLR":
        factor = _validate.check_number(owner, "factor", a["factor"], low=0.0, low_open=True,
                                        high=1.0)
        total = _positive_iters(name, "total_iters", a["total_iters"])
        return piecewise_constant((lr * factor, lr), (total,))
    if name == "CyclicLR":
        if a["scale_fn"] is not None:
            raise ValueError(f"{owner}: a custom scale_fn is not supported; use mode="
                             f"'triangular', 'triangular2' or 'exp_range'.")
        return cyclic(a["base_lr"], a["max_lr"], a["step_size_up"], a["step_size_down"],
                      a["mode"], a["gamma"])
    # SequentialLR
    schedulers, milestones = a["schedulers"], a["milestones"]
    if not isinstance(schedulers, (list, tuple)) or not schedulers:
        raise ValueError(f"{owner}: schedulers={schedulers!r} must be a non-empty list of "
                         f"(name, kwargs) pairs.")
    parts = []
    for i, item in enumerate(schedulers):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            raise ValueError(f"{owner}: schedulers[{i}]={item!r} must be a (name, kwargs) pair, "
                             f"e.g. ('LinearLR', {{'start_factor': 0.1, 'total_iters': 10}}).")
        if item[0] == "SequentialLR":
            raise ValueError(f"{owner}: schedulers[{i}] is a SequentialLR; nest with "
                             f"gradtx.schedules.join instead (torch cannot nest them either).")
        parts.append(_from_torch(item[0], lr, item[1]))
    milestones = _check_int_tuple(owner, "milestones", tuple(milestones), strict=True, low=1)
    if len(milestones) != len(parts) - 1:
        raise ValueError(f"{owner}: got {len(parts)} schedulers and {len(milestones)} milestones; "
                         f"expected one milestone fewer than schedulers.")
    return join(tuple(parts), milestones)


def from_torch(name: str, lr: float, **kwargs) -> Schedule:
    """The schedule that reproduces ``torch.optim.lr_scheduler.<name>``.

    ``lr`` is the optimizer's initial learning rate and ``kwargs`` the scheduler's own arguments with
    torch's names and defaults. The returned schedule's value at step ``t`` equals the learning rate
    torch's scheduler gives after ``t`` calls of ``scheduler.step()`` (step 0: right after
    construction), which is the rate the ``t``-th optimizer step (counting from 0) uses — so
    ``gradtx.scale_by_learning_rate(from_torch(...))`` follows torch's loop
    ``optimizer.step(); scheduler.step()``. Supported (tested against torch for 1,000 steps):

    - ``StepLR(step_size, gamma=0.1)`` → :class:`step_decay`
    - ``MultiStepLR(milestones, gamma=0.1)`` → :class:`multistep`
    - ``ExponentialLR(gamma)`` → :class:`exponential`
    - ``CosineAnnealingLR(T_max, eta_min=0)`` → :class:`cosine` with ``periodic=True`` (torch keeps
      following the cosine past ``T_max``; its recursive update equals this closed form)
    - ``CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min=0)`` → :class:`sgdr`
    - ``OneCycleLR(max_lr, total_steps | epochs·steps_per_epoch, pct_start=0.3,
      anneal_strategy='cos', div_factor=25, final_div_factor=1e4, three_phase=False)`` →
      :class:`one_cycle` (ignores ``lr``, like torch; exact for steps ``0 … total_steps-1``)
    - ``LinearLR(start_factor=1/3, end_factor=1, total_iters=5)`` → :class:`linear`
    - ``PolynomialLR(total_iters=5, power=1)`` → :class:`polynomial`
    - ``ConstantLR(factor=1/3, total_iters=5)`` → :class:`piecewise_constant`
    - ``CyclicLR(base_lr, max_lr, step_size_up=2000, step_size_down=None, mode='triangular',
      gamma=1)`` → :class:`cyclic` (ignores ``lr``, like torch)
    - ``SequentialLR(schedulers=[(name, kwargs), ...], milestones)`` → :class:`join`; like torch,
      every sub-scheduler starts from ``lr`` at its milestone.

    Momentum-cycling arguments (``cycle_momentum``, ``base_momentum``, ``max_momentum``) are accepted
    and ignored: they change the optimizer's momentum, not the learning rate. ``total_iters=0``
    (where torch's recursive and closed forms disagree) and a custom ``scale_fn`` raise
    ``ValueError``, as do unknown names and arguments (the message lists the supported ones).

    Example:
        >>> import gradtx
        >>> s = gradtx.schedules.from_torch("StepLR", 1.0, step_size=2, gamma=0.5)
        >>> s
        step_decay(init_value=1.0, step_size=2, factor=0.5)
        >>> [s(t).tolist() for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    lr = _validate.check_number("from_torch", "lr", lr, low=0.0)
    try:
        return _from_torch(name, lr, kwargs)
    except (ValueError, TypeError) as e:
        if str(e).startswith("from_torch"):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in dict(lr=lr, **kwargs).items())
        raise type(e)(f"from_torch({name!r}) with {given}: {e}") from e
