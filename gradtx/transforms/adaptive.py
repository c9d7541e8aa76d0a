"""Adaptive per-coordinate scalings: Adagrad, RMSprop (plain and centred) and Adadelta.

Each primitive divides the gradient by a running estimate of its magnitude. They keep no step
counter (none of them bias-corrects). Arithmetic is done in float32 (float64 under x64, complex for
complex gradients); the state is stored in ``nu_dtype``/``mu_dtype`` (default: the parameter's
dtype; the real counterpart for second moments of complex parameters) and the updates keep the
gradient's dtype. Adagrad's and RMSprop's statistics stored in bfloat16 are read back as stored by
the update, float16 ones unrounded (:func:`gradtx.numerics.as_stored`); Adadelta uses its
unrounded values.

Complex gradients are supported: squares are ``|g|² = g·conj(g)`` (Optax's convention). torch
instead treats a complex tensor as pairs of reals (``view_as_real``), so its statistics are kept
per real/imaginary part.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import numerics
from gradtx.base import Transform, hyperparameter, option, transform
from gradtx.tree import map_leaves

__all__ = [
    "scale_by_rss", "scale_by_rms", "scale_by_stddev", "scale_by_adadelta",
    "ScaleByRssState", "ScaleByRmsState", "ScaleByStddevState", "ScaleByAdadeltaState",
]


# --------------------------------------------------------------------------------------------
# Shared private helpers (also used by gradtx.transforms.adam and gradtx.transforms.factored)

def _real_dtype(dtype) -> jnp.dtype:
    """The real dtype of the same precision (complex64 -> float32); real dtypes unchanged."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.finfo(dtype).dtype)
    return dtype


def _first_moment_dtype(requested: str | None, leaf) -> jnp.dtype:
    """Storage dtype of a first moment (a running mean of ``g``): complex for complex leaves."""
    dtype = numerics.state_dtype(requested, leaf)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating) and \
            not jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.dtype(jnp.complex64 if jnp.finfo(dtype).bits <= 32 else jnp.complex128)
    return dtype


def _second_moment_dtype(requested: str | None, leaf) -> jnp.dtype:
    """Storage dtype of a second moment (a running mean of ``|g|²``): always real."""
    return _real_dtype(numerics.state_dtype(requested, leaf))


def _moments(params, requested: str | None, *, second: bool, value: Any = 0.0):
    """A state tree shaped like ``params``, filled with ``value``, in the moment's storage dtype."""
    dtype_of = _second_moment_dtype if second else _first_moment_dtype
    return jax.tree.map(lambda x: jnp.full(jnp.shape(x), value, dtype_of(requested, x)), params)


def _load(x: jax.Array, dtype) -> jax.Array:
    """A stored state leaf converted to the dtype the arithmetic is done in."""
    x = jnp.asarray(x)
    return x if x.dtype == dtype else x.astype(dtype)


class _Hypers:
    """A transform's hyperparameters as arrays, for one ``update``: ``h("eps", dtype)``.

    Each is read once per update (one float32 value behind one optimisation barrier, see
    :func:`gradtx.numerics.hyper`) and cast per dtype on demand, so a tree of ``n`` leaves does not
    put ``n`` copies of every hyperparameter into the program (faster tracing and compiling, same
    values: ``hyper(v, dtype) == hyper(v).astype(dtype)``).
    """

    def __init__(self, owner):
        self._owner = owner
        self._values = {}

    def __call__(self, name: str, dtype) -> jax.Array:
        if name not in self._values:
            self._values[name] = numerics.hyper(getattr(self._owner, name))
        x = self._values[name]
        return x if jnp.dtype(dtype) == x.dtype else x.astype(dtype)


def _compute(g: jax.Array):
    """The gradient in its compute dtype, with that dtype and its real counterpart."""
    gc = numerics.as_compute(g)
    return gc, gc.dtype, _real_dtype(gc.dtype)


def _divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den`` is real and ``num`` may be complex."""
    return num / den.astype(num.dtype)


# --------------------------------------------------------------------------------------------
# Adagrad

class ScaleByRssState(NamedTuple):
    """State of :class:`scale_by_rss`: the running sum of squared gradients (real)."""

    sum_of_squares: Any


@transform
class scale_by_rss(Transform):
    r"""Adagrad: divide by the root of the sum of all squared gradients so far.

    .. math::

        s_t = s_{t-1} + |g_t|^2, \qquad s_0 = \text{initial\_accumulator\_value}

        u_t = \frac{g_t}{\sqrt{s_t} + \epsilon} \quad\text{or, with eps_in_sqrt,}\quad
        u_t = \frac{g_t}{\sqrt{s_t + \epsilon}}

    Defaults follow ``torch.optim.Adagrad``: ``initial_accumulator_value=0.0`` and ``eps=1e-10``
    outside the root, so ``chain(scale_by_rss(), scale_by_learning_rate(lr))`` reproduces
    ``torch.optim.Adagrad(params, lr)`` (torch's ``lr_decay`` is a learning-rate schedule
    ``lr / (1 + (t-1)·lr_decay)``). Optax's ``optax.scale_by_rss`` uses
    ``initial_accumulator_value=0.1, eps=1e-7`` with ``eps`` inside the root: pass
    ``scale_by_rss(0.1, 1e-7, eps_in_sqrt=True)`` for that (Optax also returns 0 where the sum is
    0; here ``eps > 0`` already makes that update 0). No denominator is ever zero.
    ``nu_dtype`` is the storage dtype of the sum (default: the parameter's dtype; a low-precision
    sum stops growing once ``g²`` falls below its rounding step). State: :class:`ScaleByRssState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_rss(eps=1e-10)
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([3.0, -4.0]), state)
        >>> u, state = tx.update(jnp.array([4.0, 3.0]), state)
        >>> [round(x, 4) for x in u.tolist()], state.sum_of_squares.tolist()
        ([0.8, 0.6], [25.0, 25.0])
    """

    initial_accumulator_value: float = hyperparameter(0.0, low=0.0)
    eps: float = hyperparameter(1e-10, low=0.0, low_open=True)
    eps_in_sqrt: bool = option(False, kind="bool")
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByRssState(_moments(params, self.nu_dtype, second=True,
                                        value=self.initial_accumulator_value))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)

        def one(g, s):
            gc, _, rd = _compute(g)
            s_new = numerics.as_stored(_load(s, rd) + numerics.abs_sq(gc), s.dtype)
            eps = h("eps", rd)
            den = jnp.sqrt(s_new + eps) if self.eps_in_sqrt else jnp.sqrt(s_new) + eps
            return _divide(gc, den).astype(g.dtype), s_new.astype(s.dtype)

        updates, sums = map_leaves(self.name, one, updates, state.sum_of_squares,
                                   names=("sum_of_squares",), outputs=2,
                                   update_from_old_state=True)
        return updates, ScaleByRssState(sums)


# --------------------------------------------------------------------------------------------
# RMSprop

class ScaleByRmsState(NamedTuple):
    """State of :class:`scale_by_rms`: the exponential moving average of squared gradients."""

    nu: Any


def _rms_denominator(v, eps, eps_in_sqrt: bool):
    return jnp.sqrt(v + eps) if eps_in_sqrt else jnp.sqrt(v) + eps


@transform
class scale_by_rms(Transform):
    r"""RMSprop: divide by the root of an exponential moving average of squared gradients.

    .. math::

        v_t = \alpha v_{t-1} + (1 - \alpha) |g_t|^2, \qquad v_0 = \text{initial\_scale}

        u_t = \frac{g_t}{\sqrt{v_t} + \epsilon} \quad\text{or, with eps_in_sqrt,}\quad
        u_t = \frac{g_t}{\sqrt{v_t + \epsilon}}

    with ``α = decay``. Defaults follow ``torch.optim.RMSprop`` (``alpha=0.99, eps=1e-8``, ``eps``
    outside the root, ``v_0 = 0``): ``chain(scale_by_rms(), scale_by_learning_rate(lr))`` is
    ``torch.optim.RMSprop(params, lr)``; torch's ``momentum`` is a :class:`gradtx.trace` placed after
    this transform. Optax's ``optax.scale_by_rms`` defaults to ``decay=0.9`` with ``eps`` inside
    the root (``scale_by_rms(0.9, eps_in_sqrt=True)``); its optional ``bias_correction`` is not
    offered here. No bias correction is applied (neither torch nor Keras does), so with
    ``initial_scale=0`` the first updates are larger than ``g/|g|``. ``decay`` is in ``[0, 1]``,
    ``eps > 0``. ``nu_dtype`` is the storage dtype of ``v``. State: :class:`ScaleByRmsState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_rms(decay=0.75, eps=1e-12)
        >>> u, state = tx.update(jnp.array([2.0, -1.0]), tx.init(jnp.zeros(2)))
        >>> [round(x, 4) for x in u.tolist()], state.nu.tolist()
        ([2.0, -2.0], [1.0, 0.25])
    """

    decay: float = hyperparameter(0.99, low=0.0, high=1.0)
    eps: float = hyperparameter(1e-8, low=0.0, low_open=True)
    initial_scale: float = hyperparameter(0.0, low=0.0)
    eps_in_sqrt: bool = option(False, kind="bool")
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByRmsState(_moments(params, self.nu_dtype, second=True,
                                        value=self.initial_scale))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)

        def one(g, v):
            gc, _, rd = _compute(g)
            a = h("decay", rd)
            v_new = numerics.as_stored(a * _load(v, rd) + (1 - a) * numerics.abs_sq(gc), v.dtype)
            den = _rms_denominator(v_new, h("eps", rd), self.eps_in_sqrt)
            return _divide(gc, den).astype(g.dtype), v_new.astype(v.dtype)

        updates, nu = map_leaves(self.name, one, updates, state.nu, names=("nu",), outputs=2,
                                 update_from_old_state=True)
        return updates, ScaleByRmsState(nu)


class ScaleByStddevState(NamedTuple):
    """State of :class:`scale_by_stddev`: moving averages of the gradient and its square."""

    mu: Any
    nu: Any


@transform
class scale_by_stddev(Transform):
    r"""Centred RMSprop: divide by a running estimate of the gradient's standard deviation.

    .. math::

        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t, \qquad
        v_t = \alpha v_{t-1} + (1 - \alpha) |g_t|^2

        u_t = \frac{g_t}{\sqrt{\max(v_t - |\bar g_t|^2, 0)} + \epsilon}
        \quad\text{or, with eps_in_sqrt,}\quad
        u_t = \frac{g_t}{\sqrt{\max(v_t - |\bar g_t|^2, 0) + \epsilon}}

    with ``α = decay``, ``ḡ_0 = 0``, ``v_0 = initial_scale``. The variance estimate
    ``v - ḡ²`` is never negative in exact arithmetic (Jensen) but can be by rounding (torch then
    returns NaN); it is clamped at 0 here, so ``eps > 0`` keeps every denominator positive.
    Defaults follow ``torch.optim.RMSprop(centered=True)`` (``alpha=0.99, eps=1e-8`` outside the
    root): ``chain(scale_by_stddev(), scale_by_learning_rate(lr))`` reproduces it. Optax's
    ``optax.scale_by_stddev`` defaults to ``decay=0.9`` and ``eps`` inside the root and has no clamp.
    ``mu_dtype``/``nu_dtype`` are the storage dtypes of ``ḡ``/``v``. State: :class:`ScaleByStddevState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_stddev(decay=0.5, eps=1e-12)
        >>> u, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        >>> state.mu.tolist(), state.nu.tolist(), [round(x, 4) for x in u.tolist()]
        ([1.0], [2.0], [2.0])
    """

    decay: float = hyperparameter(0.99, low=0.0, high=1.0)
    eps: float = hyperparameter(1e-8, low=0.0, low_open=True)
    initial_scale: float = hyperparameter(0.0, low=0.0)
    eps_in_sqrt: bool = option(False, kind="bool")
    mu_dtype: Any = option(None, kind="dtype")
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByStddevState(
            mu=_moments(params, self.mu_dtype, second=False),
            nu=_moments(params, self.nu_dtype, second=True, value=self.initial_scale))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)

        def one(g, m, v):
            gc, cd, rd = _compute(g)
            a, ac = h("decay", rd), h("decay", cd)
            m_new = numerics.as_stored(ac * _load(m, cd) + (1 - ac) * gc, m.dtype)
            v_new = numerics.as_stored(a * _load(v, rd) + (1 - a) * numerics.abs_sq(gc), v.dtype)
            var = jnp.maximum(v_new - numerics.abs_sq(m_new), jnp.zeros((), rd))
            den = _rms_denominator(var, h("eps", rd), self.eps_in_sqrt)
            return (_divide(gc, den).astype(g.dtype), m_new.astype(m.dtype),
                    v_new.astype(v.dtype))

        updates, mu, nu = map_leaves(self.name, one, updates, state.mu, state.nu,
                                     names=("mu", "nu"), outputs=3, update_from_old_state=True)
        return updates, ScaleByStddevState(mu, nu)


# --------------------------------------------------------------------------------------------
# Adadelta

class ScaleByAdadeltaState(NamedTuple):
    """State of :class:`scale_by_adadelta`: moving averages of squared gradients and squared steps."""

    e_g: Any
    e_x: Any


@transform
class scale_by_adadelta(Transform):
    r"""Adadelta (Zeiler 2012): a step whose units match the parameter's.

    .. math::

        v_t = \rho v_{t-1} + (1 - \rho) |g_t|^2

        \Delta_t = \frac{\sqrt{x_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \qquad
        x_t = \rho x_{t-1} + (1 - \rho) |\Delta_t|^2

    and the update is ``Δ_t``, with ``v = e_g``, ``x = e_x`` both starting at 0. This is
    ``torch.optim.Adadelta`` exactly (defaults ``rho=0.9, eps=1e-6``; torch's ``lr`` defaults to
    1.0: ``chain(scale_by_adadelta(), scale_by_learning_rate(1.0))``) and ``optax.scale_by_adadelta``.
    ``rho`` is in ``[0, 1]``, ``eps > 0``. ``nu_dtype`` is the storage dtype of both averages.
    State: :class:`ScaleByAdadeltaState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adadelta(rho=0.25, eps=1.0)
        >>> u, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        >>> u.tolist(), state.e_g.tolist(), state.e_x.tolist()
        ([1.0], [3.0], [0.75])
    """

    rho: float = hyperparameter(0.9, low=0.0, high=1.0)
    eps: float = hyperparameter(1e-6, low=0.0, low_open=True)
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByAdadeltaState(e_g=_moments(params, self.nu_dtype, second=True),
                                    e_x=_moments(params, self.nu_dtype, second=True))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)

        def one(g, eg, ex):
            gc, _, rd = _compute(g)
            rho, eps = h("rho", rd), h("eps", rd)
            eg_new = rho * _load(eg, rd) + (1 - rho) * numerics.abs_sq(gc)
            # √(x + ε) of the *old* x: XLA keeps it as one temporary, since x is overwritten.
            root_x = jnp.sqrt(_load(ex, rd) + eps)

            def delta(g, root_x, eg_new, eps):
                gc = _compute(g)[0]
                return gc * (root_x / jnp.sqrt(eg_new + eps)).astype(gc.dtype)

            step = delta(*numerics.unshared((g, root_x, eg_new, eps)))
            ex_new = rho * _load(ex, rd) + (1 - rho) * numerics.abs_sq(step)
            return (delta(g, root_x, eg_new, eps).astype(g.dtype), eg_new.astype(eg.dtype),
                    ex_new.astype(ex.dtype))

        updates, e_g, e_x = map_leaves(self.name, one, updates, state.e_g, state.e_x,
                                       names=("e_g", "e_x"), outputs=3)
        return updates, ScaleByAdadeltaState(e_g, e_x)
