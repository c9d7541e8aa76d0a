"""The Adam family: Adam (with AMSGrad and NAdam variants), Adamax, RAdam and AdaBelief.

All keep a first moment ``m`` and a second statistic, bias-correct with the step count ``t`` (the
count after this update, ``t >= 1``) and divide. Arithmetic is done in float32 (float64 under x64,
complex for complex gradients); moments are stored in ``mu_dtype``/``nu_dtype`` (default: the
parameter's dtype; second moments of complex parameters are real) and updates keep the gradient's
dtype. A moment stored in bfloat16 is read back as stored by the update (and by AdaBelief's second
statistic); one stored in float16 is used unrounded (:func:`gradtx.numerics.as_stored`; Optax
always uses the unrounded moment). Bias corrections ``1 - β^t`` are computed as
``-expm1(t log β)``, so they stay accurate for β near 1 and at step counts up to the int32 maximum
(where the counter saturates).

Complex gradients follow Optax: squares are ``|g|²``. torch views complex tensors as pairs of reals
and keeps separate statistics for the real and imaginary parts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _validate, numerics
from gradtx.base import Transform, hyperparameter, option, transform
from gradtx.transforms.adaptive import (_compute, _divide, _load, _moments, _Hypers)
from gradtx.tree import map_leaves

__all__ = [
    "scale_by_adam", "scale_by_adamax", "scale_by_radam", "scale_by_belief",
    "ScaleByAdamState", "ScaleByAdamaxState", "ScaleByRadamState", "ScaleByBeliefState",
]


def _f32(h) -> jax.Array:
    return jnp.asarray(h, jnp.float32)


def _pow(base: Any, exponent: jax.Array) -> jax.Array:
    """``base ** exponent`` in float32 for ``0 < base`` (base read as its float32 value)."""
    return jnp.exp(exponent * numerics.log_decay(base))


def _check_eps_pair(owner: str, eps, eps_root):
    if any(_validate.is_traced(x) for x in (eps, eps_root)):
        return
    if eps == 0.0 and eps_root == 0.0:
        raise ValueError(
            f"{owner}: eps=0.0 and eps_root=0.0 would divide by zero where a gradient coordinate "
            f"has always been zero; make eps > 0 (outside the root) or eps_root > 0 (inside it).")


# --------------------------------------------------------------------------------------------
# Adam / AMSGrad / NAdam

def _read_back(x: jax.Array, storage_dtype, count: jax.Array) -> jax.Array:
    """``x`` (a new moment, already as stored) read back from its state buffer by every later
    loop: :func:`gradtx.numerics.computed_once` on the stored value, so a bfloat16 moment's buffer
    is what the later loops read, not a float32 temporary."""
    return _load(numerics.computed_once(x.astype(storage_dtype), count), x.dtype)


class ScaleByAdamState(NamedTuple):
    """State of :class:`scale_by_adam`.

    ``count`` (int32) is the number of updates done; ``mu``/``nu`` are the raw (not bias-corrected)
    first and second moments; ``nu_max`` is the running maximum of ``nu`` when ``amsgrad=True`` and
    ``()`` otherwise; ``mu_product`` is the float32 scalar ``∏ μ_s`` of torch NAdam's momentum
    schedule (held at 1.0 when ``momentum_decay`` is None, so the structure is always the same).
    """

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any
    mu_product: jax.Array


@transform
class scale_by_adam(Transform):
    r"""Adam (Kingma & Ba 2015), with AMSGrad and NAdam as options.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2

        \hat v_t = \frac{v_t}{1 - \beta_2^t}, \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    with the numerator ``m̂_t`` chosen by the options:

    * default: ``m̂_t = m_t / (1 - β₁ᵗ)`` (Adam).
    * ``nesterov=True``: NAdam with a constant β₁ (Dozat 2016, as ``optax.scale_by_adam(nesterov=True)``
      and ``optax.nadam``): ``m̂_t = β₁ m_t / (1 - β₁^{t+1}) + (1 - β₁) g_t / (1 - β₁ᵗ)``.
    * ``nesterov=True, momentum_decay=ψ``: ``torch.optim.NAdam`` exactly, with the momentum
      schedule ``μ_t = β₁ (1 - ½·0.96^{tψ})`` and ``Π_t = μ_1⋯μ_t`` (kept in ``mu_product``):
      ``m̂_t = (1 - μ_t) g_t / (1 - Π_t) + μ_{t+1} m_t / (1 - Π_t μ_{t+1})``. torch's default is
      ``momentum_decay=4e-3``. ``m_t`` is still the constant-β₁ average, as in torch.
      ``momentum_decay`` without ``nesterov=True`` is rejected: the schedule only exists in NAdam.

    ``amsgrad=True`` (Reddi et al. 2018, as ``torch.optim.Adam(amsgrad=True)``) keeps
    ``v_max_t = max(v_max_{t-1}, v_t)`` on the raw ``v`` and uses ``v_max_t / (1 - β₂ᵗ)`` in place of
    ``v̂_t`` (Optax's ``scale_by_amsgrad`` takes the maximum of the bias-corrected ``v̂``
    instead, which differs in early steps). It combines with either NAdam form.

    Defaults ``b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0`` are torch's and Optax's;
    ``chain(scale_by_adam(), scale_by_learning_rate(lr))`` is ``torch.optim.Adam(params, lr)``.
    torch puts ``eps`` after dividing ``√v`` by ``√(1 - β₂ᵗ)``, as here. ``b1, b2`` are in
    ``[0, 1)``, ``eps, eps_root >= 0`` and not both zero. ``mu_dtype``/``nu_dtype`` are the storage
    dtypes of ``m`` and ``v`` (and ``v_max``). State: :class:`ScaleByAdamState`.

    Both bias corrections are applied as multiplications by their reciprocals,
    ``m̂ = m · (1/(1 - β₁ᵗ))`` and ``v̂ = v · (1/(1 - β₂ᵗ))`` (one scalar division per step): XLA
    rewrites a division by a scalar into that form in some programs and not in others, so writing
    it this way gives the same bits under ``jit`` and eagerly, in every program. Within a
    :class:`gradtx.chain`, a later member that takes norms of the updates
    (:class:`gradtx.scale_by_trust_ratio`, as in :func:`gradtx.lamb`) recomputes the direction from
    the new ``m``, ``v`` and count instead of materialising it (when the moments are stored in the
    dtype they are computed in; see ``docs/performance.md``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adam()
        >>> u, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> [round(x, 4) for x in u.tolist()], int(state.count)
        ([1.0, -1.0], 1)
        >>> gradtx.scale_by_adam(momentum_decay=0.004)
        Traceback (most recent call last):
        ...
        ValueError: scale_by_adam: momentum_decay=0.004 needs nesterov=True (it is torch.optim.NAdam's momentum schedule); pass nesterov=True, or momentum_decay=None for Adam.
    """

    b1: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = hyperparameter(0.999, low=0.0, high=1.0, high_open=True)
    eps: float = hyperparameter(1e-8, low=0.0)
    eps_root: float = hyperparameter(0.0, low=0.0)
    amsgrad: bool = option(False, kind="bool")
    nesterov: bool = option(False, kind="bool")
    momentum_decay: float | None = hyperparameter(None, low=0.0, low_open=True, allow_none=True)
    mu_dtype: Any = option(None, kind="dtype")
    nu_dtype: Any = option(None, kind="dtype")

    def _check(self):
        _check_eps_pair(self.name, self.eps, self.eps_root)
        if self.momentum_decay is not None and not self.nesterov:
            shown = ("<traced>" if _validate.is_traced(self.momentum_decay)
                     else repr(self.momentum_decay))
            raise ValueError(
                f"{self.name}: momentum_decay={shown} needs nesterov=True (it is "
                f"torch.optim.NAdam's momentum schedule); pass nesterov=True, or "
                f"momentum_decay=None for Adam.")

    def init(self, params):
        return ScaleByAdamState(
            count=numerics.init_count(),
            mu=_moments(params, self.mu_dtype, second=False),
            nu=_moments(params, self.nu_dtype, second=True),
            nu_max=_moments(params, self.nu_dtype, second=True) if self.amsgrad else (),
            mu_product=jnp.ones((), jnp.float32))

    def _numerator_coefficients(self, count, mu_product):
        """Scalars ``(c_m, c_g, new_mu_product)`` with ``m̂ = c_m·m + c_g·g`` (float32)."""
        t = count.astype(jnp.float32)
        if self.momentum_decay is not None:
            b1 = _f32(self.b1)
            psi = _f32(self.momentum_decay)
            mu_t = b1 * (1.0 - 0.5 * _pow(0.96, t * psi))
            mu_next = b1 * (1.0 - 0.5 * _pow(0.96, (t + 1.0) * psi))
            product = mu_product * mu_t
            return mu_next / (1.0 - product * mu_next), (1.0 - mu_t) / (1.0 - product), product
        bc1 = numerics.bias_correction(self.b1, count)
        if self.nesterov:
            bc1_next = numerics.bias_correction(self.b1, numerics.safe_increment(count))
            return _f32(self.b1) / bc1_next, (1.0 - _f32(self.b1)) / bc1, mu_product
        return 1.0 / bc1, jnp.zeros((), jnp.float32), mu_product

    def _direction(self, h, bc2, c_m, c_g, gc, m_new, v_used):
        """``m̂ / (√(v̂ + ε_root) + ε)`` from the new moments, in the compute dtype."""
        cd, rd = m_new.dtype, v_used.dtype
        den = jnp.sqrt(v_used * (1 / bc2.astype(rd)) + h("eps_root", rd)) + h("eps", rd)
        num = c_m.astype(cd) * m_new
        if self.nesterov:
            num = num + c_g.astype(cd) * gc
        return _divide(num, den)

    def update(self, updates, state, params=None, **extra):
        del params, extra
        return self._update(updates, state, keep_moments=False)

    def _update(self, updates, state, keep_moments: bool):
        h = _Hypers(self)
        count = numerics.safe_increment(state.count)
        c_m, c_g, mu_product = self._numerator_coefficients(count, state.mu_product)
        bc2 = numerics.bias_correction(self.b2, count)

        def one(g, m, v, *v_max):
            gc, cd, rd = _compute(g)
            b1, b2 = h("b1", cd), h("b2", rd)
            m_new = b1 * _load(m, cd) + (1 - b1) * gc
            v_new = b2 * _load(v, rd) + (1 - b2) * numerics.abs_sq(gc)
            m_new = numerics.as_stored(m_new, m.dtype)
            v_new = numerics.as_stored(v_new, v.dtype)
            if keep_moments:
                # every later loop (the parameter update, a trust ratio's norm) reads the new
                # moments back from their buffers instead of recomputing them from the old state
                m_new = _read_back(m_new, m.dtype, count)
                v_new = _read_back(v_new, v.dtype, count)
            v_stored = v_new.astype(v.dtype)
            if self.amsgrad:
                v_max_stored = jnp.maximum(v_max[0], v_stored)
                if v_max_stored.dtype == jnp.bfloat16:
                    # the update reads the new maximum from its buffer: recomputed (XLA
                    # duplicates a cheap bfloat16 max into the update's loop), it would read
                    # the old ν_max after the in-place write, and XLA would copy the buffer
                    v_max_stored = numerics.computed_once(v_max_stored, count)
                v_used = _load(v_max_stored, rd)
            else:
                v_used = v_new
            direction = self._direction(h, bc2, c_m, c_g, gc, m_new, v_used)
            out = (direction.astype(g.dtype), m_new.astype(m.dtype), v_stored)
            return out + ((v_max_stored,) if self.amsgrad else ())

        others = (state.mu, state.nu) + ((state.nu_max,) if self.amsgrad else ())
        names = ("mu", "nu") + (("nu_max",) if self.amsgrad else ())
        results = map_leaves(self.name, one, updates, *others, names=names,
                             outputs=len(others) + 1, update_from_old_state=not keep_moments)
        nu_max = results[3] if self.amsgrad else ()
        return results[0], ScaleByAdamState(count, results[1], results[2], nu_max, mu_product)

    def _replayable_update(self, updates, state, params=None, **extra):
        """:meth:`update`, and a function that recomputes its updates, bit for bit, from the
        state it returns (and the gradients, for NAdam) -- ``None`` where that state does not
        determine them: moments stored in float16 (the direction uses the unrounded values;
        bfloat16 moments are read back as stored, so they replay), or torch's NAdam schedule
        (its coefficients need the previous ``mu_product``). With a replay the new moments are
        kept in their buffers (:func:`gradtx.numerics.computed_once`). See :class:`gradtx.chain`."""
        del params, extra
        replayable = self._read_as_stored(updates, state)
        updates, new_state = self._update(updates, state, keep_moments=replayable)
        return updates, new_state, (self._replay if replayable else None)

    def _read_as_stored(self, updates, state) -> bool:
        """Whether the direction reads every moment as its state stores it (and no NAdam
        schedule): moments stored in the dtype they are computed in, or in bfloat16
        (:func:`gradtx.numerics.as_stored`), not in float16."""
        if self.momentum_decay is not None:
            return False
        seconds = (state.nu,) + ((state.nu_max,) if self.amsgrad else ())
        for g, m, *vs in zip(*map(jax.tree.leaves, (updates, state.mu) + seconds)):
            _, cd, rd = _compute(g)
            moments = ((m, cd),) + tuple((v, rd) for v in vs)
            if any(x.dtype not in (want, jnp.bfloat16) for x, want in moments):
                return False
        return True

    def _replay(self, updates, new_state, params=None):
        """The direction from the new state (see :meth:`_replayable_update`)."""
        del params
        count = new_state.count
        c_m, c_g, _ = self._numerator_coefficients(count, new_state.mu_product)
        scalars = (c_m, c_g, numerics.bias_correction(self.b2, count),
                   numerics.hyper(self.eps), numerics.hyper(self.eps_root))

        def one(g, m, v):
            # each leaf reads its moments and the scalars through its own barrier: a scalar's
            # broadcast shared by the reductions of equal-shaped leaves would be materialised
            g, m, v, c_m, c_g, bc2, eps, eps_root = numerics.unshared((g, m, v, *scalars))
            h = {"eps": eps, "eps_root": eps_root}
            gc, cd, rd = _compute(g)
            return self._direction(lambda name, dtype: h[name].astype(dtype), bc2, c_m, c_g, gc,
                                   _load(m, cd), _load(v, rd)).astype(g.dtype)

        v_used = new_state.nu_max if self.amsgrad else new_state.nu
        return map_leaves(self.name, one, updates, new_state.mu, v_used, names=("mu", "nu"))


# --------------------------------------------------------------------------------------------
# Adamax

class ScaleByAdamaxState(NamedTuple):
    """State of :class:`scale_by_adamax`: the step count, the first moment, the infinity norm."""

    count: jax.Array
    mu: Any
    nu: Any


@transform
class scale_by_adamax(Transform):
    r"""Adamax (Kingma & Ba 2015, §7): Adam with the infinity norm in place of the second moment.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u^{\infty}_t = \max(\beta_2 u^{\infty}_{t-1}, |g_t| + \epsilon), \qquad
        u_t = \frac{m_t}{(1 - \beta_1^t)\, u^{\infty}_t}

    This is ``torch.optim.Adamax`` exactly (``eps`` added to ``|g|`` inside the max; defaults
    ``b1=0.9, b2=0.999, eps=1e-8``) and ``optax.scale_by_adamax``. Because ``eps > 0`` is
    required, ``u^∞ >= eps`` and no division is by zero. For complex gradients ``|g|`` is the
    modulus (torch takes the real and imaginary parts separately). ``mu_dtype``/``nu_dtype`` are the
    storage dtypes of ``m`` and ``u^∞``. State: :class:`ScaleByAdamaxState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adamax(eps=1e-12)
        >>> u, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> [round(x, 4) for x in u.tolist()], [round(x, 4) for x in state.nu.tolist()]
        ([1.0, -1.0], [0.5, 2.0])
    """

    b1: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = hyperparameter(0.999, low=0.0, high=1.0)
    eps: float = hyperparameter(1e-8, low=0.0, low_open=True)
    mu_dtype: Any = option(None, kind="dtype")
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByAdamaxState(numerics.init_count(),
                                  _moments(params, self.mu_dtype, second=False),
                                  _moments(params, self.nu_dtype, second=True))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)
        count = numerics.safe_increment(state.count)
        bc1 = numerics.bias_correction(self.b1, count)

        def one(g, m, n):
            gc, cd, rd = _compute(g)
            b1 = h("b1", cd)
            m_new = numerics.as_stored(b1 * _load(m, cd) + (1 - b1) * gc, m.dtype)
            n_new = numerics.as_stored(jnp.maximum(h("b2", rd) * _load(n, rd),
                                                   jnp.abs(gc) + h("eps", rd)), n.dtype)
            u = _divide(m_new, bc1.astype(rd) * n_new)
            return u.astype(g.dtype), m_new.astype(m.dtype), n_new.astype(n.dtype)

        updates, mu, nu = map_leaves(self.name, one, updates, state.mu, state.nu,
                                     names=("mu", "nu"), outputs=3, update_from_old_state=True)
        return updates, ScaleByAdamaxState(count, mu, nu)


# --------------------------------------------------------------------------------------------
# RAdam

class ScaleByRadamState(NamedTuple):
    """State of :class:`scale_by_radam`: the step count and Adam's raw moments."""

    count: jax.Array
    mu: Any
    nu: Any


def _series_c(y: jax.Array) -> jax.Array:
    """``C(y) = 1/y - 1/(e^y - 1)`` for ``y >= 0`` (``C(0) = 1/2``), without cancellation."""
    small = y < 0.5
    ys = jnp.where(small, jnp.ones_like(y), y)
    direct = 1.0 / ys - 1.0 / jnp.expm1(ys)
    y2 = y * y
    series = 0.5 - y / 12.0 * (1.0 - y2 / 60.0 * (1.0 - y2 / 42.0 * (1.0 - y2 / 40.0)))
    return jnp.where(small, series, direct)


def _radam_rho(b2: Any, count: jax.Array):
    """``(ρ_t, ρ∞)`` in float32, accurate where the textbook formula cancels.

    With ``x = -log β₂``: ``ρ_t = ρ∞ - 2tβ₂ᵗ/(1 - β₂ᵗ) = 1 + 2(t·C(tx) - C(x))`` where
    ``C(y) = 1/y - 1/(e^y - 1)``; the textbook form loses ~4 digits in float32 for β₂ = 0.999.
    """
    t = count.astype(jnp.float32)
    b2 = _f32(b2)
    x = -numerics.log_decay(b2)
    rho_inf = (1.0 + b2) / (1.0 - b2)
    rho_t = 1.0 + 2.0 * (t * _series_c(t * x) - _series_c(x))
    return rho_t, rho_inf


@transform
class scale_by_radam(Transform):
    r"""Rectified Adam (Liu et al. 2020): Adam whose adaptive step is switched on once its variance
    is tractable.

    .. math::

        \rho_\infty = \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \qquad
        \hat m_t = \frac{m_t}{1 - \beta_1^t}

        u_t = \begin{cases}
          r_t\, \hat m_t \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}, &
          \rho_t > \text{threshold}, \quad
          r_t = \sqrt{\dfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
          \hat m_t & \text{otherwise}
        \end{cases}

    with ``m, v`` Adam's moments. This is ``torch.optim.RAdam`` exactly (strict ``ρ_t > 5``, ``eps``
    added to ``√v`` before bias correction; defaults ``b1=0.9, b2=0.999, eps=1e-8``). The paper's
    threshold is 4; torch and Optax use 5 (the default). ``threshold`` must be ``>= 4`` so ``r_t`` is
    real. Differences from ``optax.scale_by_radam``: Optax switches on at ``ρ_t >= threshold`` and
    adds ``eps`` to ``√v̂`` (after bias correction), i.e. its ``eps`` is ``√(1-β₂ᵗ)`` times larger
    in effect; both are invisible unless ``eps`` is comparable to ``√v``. ``ρ_t`` is computed in a
    cancellation-free form (see the source), so the switch step and ``r_t`` match float64 and
    torch; Optax evaluates the textbook formula in float32, which for ``b2=0.999`` puts about 1%
    error into its first rectified update (0.1% by step 40).
    State: :class:`ScaleByRadamState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_radam()
        >>> u, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> [round(x, 4) for x in u.tolist()]   # step 1: rho_1 = 1 <= 5, plain momentum
        [0.5, -2.0]
    """

    b1: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = hyperparameter(0.999, low=0.0, high=1.0, high_open=True)
    eps: float = hyperparameter(1e-8, low=0.0, low_open=True)
    threshold: float = hyperparameter(5.0, low=4.0)
    mu_dtype: Any = option(None, kind="dtype")
    nu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByRadamState(numerics.init_count(),
                                 _moments(params, self.mu_dtype, second=False),
                                 _moments(params, self.nu_dtype, second=True))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)
        count = numerics.safe_increment(state.count)
        bc1 = numerics.bias_correction(self.b1, count)
        bc2 = numerics.bias_correction(self.b2, count)
        rho_t, rho_inf = _radam_rho(self.b2, count)
        rectify = rho_t > _f32(self.threshold)
        one_ = jnp.ones((), jnp.float32)
        r2 = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
              / jnp.where(rectify, (rho_inf - 4.0) * (rho_inf - 2.0) * rho_t, one_))
        r = jnp.sqrt(jnp.where(rectify, jnp.maximum(r2, 0.0), one_))
        # Per-leaf scale of m̂ in the rectified case is r·√bc2/(√v + eps); otherwise 1.
        rect_factor = r * jnp.sqrt(bc2)

        def one(g, m, v):
            gc, cd, rd = _compute(g)
            b1, b2 = h("b1", cd), h("b2", rd)
            m_new = numerics.as_stored(b1 * _load(m, cd) + (1 - b1) * gc, m.dtype)
            v_new = numerics.as_stored(b2 * _load(v, rd) + (1 - b2) * numerics.abs_sq(gc), v.dtype)
            m_hat = _divide(m_new, bc1.astype(rd))
            scale = rect_factor.astype(rd) / (jnp.sqrt(v_new) + h("eps", rd))
            scale = jnp.where(rectify, scale, jnp.ones((), rd))
            return ((m_hat * scale.astype(cd)).astype(g.dtype), m_new.astype(m.dtype),
                    v_new.astype(v.dtype))

        updates, mu, nu = map_leaves(self.name, one, updates, state.mu, state.nu,
                                     names=("mu", "nu"), outputs=3, update_from_old_state=True)
        return updates, ScaleByRadamState(count, mu, nu)


# --------------------------------------------------------------------------------------------
# AdaBelief

def _elementwise(value: jax.Array, like: jax.Array) -> jax.Array:
    """The scalar ``value`` as an array shaped like ``like``: exactly ``value`` everywhere.

    Performance only (the result equals ``value`` bit for bit, NaN in ``like`` included). XLA's CPU
    fusion freely duplicates an op whose only array operand is as large as its result, such as
    ``s + eps_root`` with a scalar ``eps_root``; it then recomputes ``s_t`` from the *old* ``s`` inside
    the parameter update's loop, and, because the new ``s`` is written in place into the donated
    state buffer, inserts a full copy of every state leaf (a temporary allocated on each step). An
    ``eps_root`` computed from ``like`` makes the last add a two-array op, which XLA materialises
    once: the update then reads the new ``s`` and the copy disappears.
    """
    return jnp.where(like != like, value, value)


class ScaleByBeliefState(NamedTuple):
    """State of :class:`scale_by_belief`: the step count, ``m`` and the belief statistic ``s``."""

    count: jax.Array
    mu: Any
    nu: Any


@transform
class scale_by_belief(Transform):
    r"""AdaBelief (Zhuang et al. 2020): Adam that divides by the spread of ``g`` around its mean.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        s_t = \beta_2 s_{t-1} + (1 - \beta_2) |g_t - m_t|^2 + \epsilon_{root}

        u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{s_t / (1 - \beta_2^t)} + \epsilon}

    The paper (Algorithm 2) adds the same ε inside ``s`` and in the denominator; here the two are
    separate: ``eps_root`` (inside ``s``, accumulated every step) and ``eps`` (outside the root),
    both 1e-16 by default as in the authors' ``adabelief-pytorch`` 0.2. This is exactly
    ``optax.scale_by_belief`` (same arguments and defaults; its ``nesterov`` variant is not offered).
    ``eps, eps_root >= 0`` and not both zero. ``mu_dtype``/``nu_dtype`` are the storage dtypes of
    ``m`` and ``s``. State: :class:`ScaleByBeliefState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_belief()
        >>> u, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> [round(x, 4) for x in u.tolist()]   # m̂ = g, ŝ = (0.9 g)²
        [1.1111, -1.1111]
    """

    b1: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = hyperparameter(0.999, low=0.0, high=1.0, high_open=True)
    eps: float = hyperparameter(1e-16, low=0.0)
    eps_root: float = hyperparameter(1e-16, low=0.0)
    mu_dtype: Any = option(None, kind="dtype")
    nu_dtype: Any = option(None, kind="dtype")

    def _check(self):
        _check_eps_pair(self.name, self.eps, self.eps_root)

    def init(self, params):
        return ScaleByBeliefState(numerics.init_count(),
                                  _moments(params, self.mu_dtype, second=False),
                                  _moments(params, self.nu_dtype, second=True))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)
        count = numerics.safe_increment(state.count)
        bc1 = numerics.bias_correction(self.b1, count)
        bc2 = numerics.bias_correction(self.b2, count)

        def one(g, m, s):
            gc, cd, rd = _compute(g)
            b1, b2 = h("b1", cd), h("b2", rd)
            m_new = numerics.as_stored(b1 * _load(m, cd) + (1 - b1) * gc, m.dtype)
            s_new = numerics.as_stored(b2 * _load(s, rd) + (1 - b2) * numerics.abs_sq(gc - m_new)
                                       + _elementwise(h("eps_root", rd), gc), s.dtype)
            den = jnp.sqrt(s_new / bc2.astype(rd)) + h("eps", rd)
            u = _divide(m_new, bc1.astype(rd) * den)
            return u.astype(g.dtype), m_new.astype(m.dtype), s_new.astype(s.dtype)

        updates, mu, nu = map_leaves(self.name, one, updates, state.mu, state.nu,
                                     names=("mu", "nu"), outputs=3)
        return updates, ScaleByBeliefState(count, mu, nu)
