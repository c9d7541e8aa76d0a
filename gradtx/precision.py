"""Low-precision training: float32 master weights, stochastic rounding, dynamic loss scaling.

- :class:`master_weights` keeps a float32 copy of bfloat16/float16 parameters in the optimizer state,
  runs the inner optimizer in float32 against it, and emits updates that move the low-precision
  parameters to the rounded master weights.
- :class:`stochastic_rounding` (and the array function :func:`stochastic_round`) applies updates to
  bfloat16/float16 parameters with unbiased random rounding instead of a master copy, so small
  updates are not lost to round-to-nearest.
- :class:`dynamic_loss_scale` implements dynamic loss scaling for float16 training around any
  optimizer; :func:`loss_scale` reads the current scale from any state.

Every transform here is a frozen, hashable gradtx transform with a NamedTuple state; inner
optimizers may be gradtx or Optax transforms and receive the extra keyword arguments of ``update``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _validate, counter_random, numerics
from gradtx.base import Transform, add_update, hyperparameter, option, transform
from gradtx.combine import _check_member, call_update, update_if
from gradtx.tree import TreeMismatchError, all_finite, first_difference, map_leaves

__all__ = [
    "master_weights", "MasterWeightsState", "NoMasterCopy",
    "stochastic_rounding", "StochasticRoundingState", "stochastic_round",
    "dynamic_loss_scale", "DynamicLossScaleState", "loss_scale",
]


def _is_low_precision(dtype, wide) -> bool:
    """True for real floating dtypes narrower than ``wide`` (bfloat16/float16 against float32)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return False
    return jnp.finfo(dtype).bits < jnp.finfo(jnp.dtype(wide)).bits


# --------------------------------------------------------------------------------------------
# master_weights


class NoMasterCopy(NamedTuple):
    """Stands in :class:`MasterWeightsState` ``master`` for a parameter kept without a master copy.

    A pytree with no leaves (it costs no memory): the parameter is already at least as precise as
    the master dtype (a float32 parameter with float32 master weights), or is not floating-point.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.master_weights(gradtx.sgd(0.1))
        >>> state = tx.init({"w": jnp.zeros(2, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)})
        >>> state.master["w"].dtype.name, state.master["b"]
        ('float32', NoMasterCopy())
    """


def _is_no_master(x) -> bool:
    return isinstance(x, NoMasterCopy)


class MasterWeightsState(NamedTuple):
    """State of :class:`master_weights`.

    ``master``: the parameters' tree with a master-dtype copy of each low-precision parameter and
    :class:`NoMasterCopy` (no leaves) for the others; ``inner_state``: the inner optimizer's state,
    built from the master copies (so its moments default to the master dtype).
    """

    master: Any
    inner_state: Any


@transform
class master_weights(Transform):
    """Train low-precision (bfloat16/float16) parameters through a float32 master copy.

    The state keeps ``m = float32(p)`` for each parameter ``p`` narrower than ``master_dtype``
    (initialised from the parameters given to ``init``). Each update, for such a leaf:

    .. math::

        u_{in} = \\mathrm{inner}(\\mathrm{f32}(g);\\ m), \\quad m \\leftarrow m + u_{in}
        \\ (\\text{in float32}), \\quad u = \\mathrm{f32}(\\mathrm{round}_{p}(m)) - \\mathrm{f32}(p)

    so the inner optimizer sees float32 gradients and float32 parameters (its state is built from
    the master copies, so moments default to float32), the master weights accumulate every update
    in float32 — updates far below the parameters' resolution are kept — and the emitted update
    moves ``p`` to the master weights rounded to ``p``'s dtype.

    **Update dtype.** The emitted updates of master-copied leaves are float32 (not the gradient's
    dtype): :func:`gradtx.apply_updates` adds them in float32 and rounds once, so
    ``apply_updates(p, u) == round(m)`` bit for bit whenever ``round(m) - p`` is exact in float32 —
    always, except when a parameter shrinks in magnitude by more than about ``2**16`` (bfloat16) or
    ``2**13`` (float16) in one step; then the result is within half a float32 ulp of ``p`` of the
    target. Either way ``m`` stays exact and the next update is computed against the parameters
    actually passed, so nothing accumulates. Use it as the outermost transform (a transform after it
    would see float32 updates of the rounded step).

    **Leaves without a copy.** Parameters already as precise as ``master_dtype`` (float32, float64)
    and non-floating leaves get no master copy (:class:`NoMasterCopy`, no memory) and pass through
    unchanged: the inner optimizer sees their gradients and parameters as they are.

    ``master_dtype``: ``"float32"`` (default) or ``"float64"``. Needs ``params``. The master copy is
    authoritative: to change the parameters from outside the optimizer, re-``init`` it.

    Optax: no equivalent (apply Optax updates to a float32 copy by hand). torch: the mixed-precision
    "master weights" pattern (fp32 params with ``torch.autocast``, or apex's ``O2`` master params).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.master_weights(gradtx.scale_by_learning_rate(2.0**-10))
        >>> p = jnp.ones(1, jnp.bfloat16)
        >>> state = tx.init(p)
        >>> for _ in range(4):
        ...     u, state = tx.update(jnp.ones(1, jnp.bfloat16), state, p)
        ...     p = gradtx.apply_updates(p, u)
        >>> p.tolist(), state.master.tolist(), u.dtype.name
        ([0.99609375], [0.99609375], 'float32')

    (Without master weights each step ``1 - 2**-10`` rounds back to ``1.0`` in bfloat16.)
    """

    inner: Any = option()
    master_dtype: Any = option("float32", kind="dtype")

    def _check(self):
        _check_member("master_weights", self.inner, "inner")
        if self.master_dtype not in ("float32", "float64"):
            raise ValueError(f"master_weights: master_dtype={self.master_dtype!r} is not a "
                             f"master precision; expected 'float32' or 'float64'.")

    def _copied(self, leaf) -> bool:
        return _is_low_precision(jnp.result_type(leaf), self.master_dtype)

    def init(self, params):
        def copy(p):
            if self._copied(p):
                return jnp.asarray(p).astype(self.master_dtype)
            return NoMasterCopy()

        master = jax.tree.map(copy, params)
        inner_params = jax.tree.map(lambda p, m: p if _is_no_master(m) else m, params, master,
                                    is_leaf=_is_no_master)
        return MasterWeightsState(master, self.inner.init(inner_params))

    def update(self, updates, state, params=None, **extra):
        self.require_params(params)
        # structure/shape checks of the updates against the params
        map_leaves(self.name, lambda g, p: None, updates, params, names=("params",))
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        m_leaves, m_def = jax.tree.flatten(state.master, is_leaf=_is_no_master)
        if m_def != treedef:
            raise TreeMismatchError(
                f"{self.name}: the updates do not have the structure of its master weights "
                f"({first_difference(updates, state.master)}). Initialise the optimizer with the "
                f"same parameter tree you pass gradients for.")

        wide = jnp.dtype(self.master_dtype)
        inner_g = [g if _is_no_master(m) else jnp.asarray(g).astype(wide)
                   for g, m in zip(g_leaves, m_leaves)]
        inner_p = [p if _is_no_master(m) else m for p, m in zip(p_leaves, m_leaves)]
        inner_u, inner_state = call_update(self.inner, treedef.unflatten(inner_g),
                                           state.inner_state, treedef.unflatten(inner_p), extra)
        u_leaves = treedef.flatten_up_to(inner_u)

        out, new_master = [], []
        for u, p, m in zip(u_leaves, p_leaves, m_leaves):
            if _is_no_master(m):
                out.append(u)
                new_master.append(m)
                continue
            m = add_update(m, u)
            p = jnp.asarray(p)
            out.append(m.astype(p.dtype).astype(wide) - p.astype(wide))
            new_master.append(m)
        return treedef.unflatten(out), MasterWeightsState(treedef.unflatten(new_master),
                                                          inner_state)


# --------------------------------------------------------------------------------------------
# stochastic rounding


def stochastic_round(x, key, dtype) -> jax.Array:
    """Round ``x`` to ``dtype`` at random, unbiasedly: ``E[stochastic_round(x)] = x``.

    Each element becomes one of its two neighbours ``lo <= x <= hi`` in ``dtype``, ``hi`` with
    probability ``(x - lo) / (hi - lo)``; values exactly representable in ``dtype`` are unchanged,
    and NaN, ±Inf and values beyond ``dtype``'s finite range round as ``x.astype(dtype)`` does.

    For float32 → bfloat16 this is the classic bit trick: add 16 uniformly random bits below the
    bfloat16 mantissa of the float32 bit pattern and truncate them (exact, one integer add). Other
    targets (float16 and the float8 formats, subnormals included; the neighbours are found by
    stepping the bit pattern) draw a uniform ``r`` in ``[0, 1)`` and pick ``hi`` when
    ``r < (x - lo) / (hi - lo)`` (``r`` has 24 bits, 32 for float64 input: the probability is
    exact to 2**-24 of the gap, 2**-32 for float64). ``key`` is a JAX PRNG key (typed or raw
    ``uint32``); the same key gives the same result. A target without a sign bit or narrower than
    a byte (``float8_e8m0fnu``, ``float4_e2m1fn``) is a ``TypeError``.

    The random bits are a hash of each element's index and two words drawn from ``key``
    (MurmurHash3's finaliser, a few integer operations per element, fused into the rounding loop),
    not a Threefry evaluation per element: on the 2-core CPU, rounding a 16M-element float32
    array to bfloat16 (jitted, with its fresh output buffer) takes 19 ms instead of 222 ms, and
    ``chain(adamw(...), stochastic_rounding())`` on a 16M-element bfloat16 leaf steps in 54 ms
    instead of 253 ms. torch has no built-in
    stochastic rounding (torchao's bf16 optimizers implement the same bit trick); Optax has none.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> x = jnp.full(100_000, 1.0 + 2.0**-10, jnp.float32)   # 1/8 of the way to the next bf16
        >>> y = gradtx.stochastic_round(x, jax.random.key(0), jnp.bfloat16)
        >>> sorted(set(y.astype(jnp.float32).tolist())), bool(abs(y.astype(jnp.float32).mean() - x[0]) < 1e-4)
        ([1.0, 1.0078125], True)
    """
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"stochastic_round: expected real floating-point input and dtype; got "
                        f"{x.dtype} -> {dtype}.")
    if jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
        return x.astype(dtype)
    _check_target(dtype)
    return _stochastic_round_words(x, counter_random.key_words(jnp.asarray(key)), dtype)


# the unsigned integer type of each float width, for bit-pattern arithmetic
_UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _next_float(v, up: bool) -> jax.Array:
    """The neighbour of each finite ``v`` one representable step up (toward +inf) or down, in
    ``v``'s dtype, from its bit pattern: ``jnp.nextafter`` returns NaN for the 8-bit floats.
    From ±0 the step is the smallest subnormal of the direction's sign; in formats without a
    negative zero (``*fnuz``) a step from the smallest negative subnormal up lands on +0."""
    width = jnp.finfo(v.dtype).bits
    uint = _UNSIGNED[width]
    sign_bit = 1 << (width - 1)
    bits = jax.lax.bitcast_convert_type(v, uint)
    negative = (bits & uint(sign_bit)) != 0
    away_from_zero = negative != up
    step = jnp.where(away_from_zero, bits + uint(1), bits - uint(1))
    zero = (bits & uint(sign_bit - 1)) == 0
    step = jnp.where(zero, uint(1 if up else sign_bit | 1), step)
    if _has_no_negative_zero(v.dtype):
        step = jnp.where(step == uint(sign_bit), uint(0), step)
    return jax.lax.bitcast_convert_type(step, v.dtype)


def _has_no_negative_zero(dtype) -> bool:
    width = jnp.finfo(dtype).bits
    return bool(np.isnan(np.array([1 << (width - 1)], _UNSIGNED[width]).view(dtype)
                         .astype(np.float32))[0])


def _check_target(dtype) -> None:
    """Stochastic rounding needs a signed float format of 8 or more bits with a zero."""
    info = jnp.finfo(dtype)
    zero_ok = bool(np.array([0], np.dtype(dtype)).astype(np.float32)[0] == 0)
    signed = bool(np.array([-1.0], np.float32).astype(dtype).astype(np.float32)[0] < 0)
    if info.bits not in (8, 16, 32, 64) or not (zero_ok and signed):
        raise TypeError(f"stochastic_round: dtype={jnp.dtype(dtype).name} is not supported; "
                        f"expected a signed floating-point format of 8, 16, 32 or 64 bits with a "
                        f"zero (bfloat16, float16, float32, the float8 formats).")


def _stochastic_round_words(x, words, dtype) -> jax.Array:
    """:func:`stochastic_round` with the random bits drawn from two uint32 ``words``
    (:mod:`gradtx.counter_random`); ``dtype`` narrower than ``x``."""
    nearest = x.astype(dtype)
    if x.dtype == jnp.float32 and dtype == jnp.dtype(jnp.bfloat16):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = counter_random.random_bits(words, x.shape) >> jnp.uint32(16)
        rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
        out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(dtype)
    else:
        wide = x.dtype
        near_w = nearest.astype(wide)
        below = near_w <= x
        lo = jnp.where(below, nearest, _next_float(nearest, up=False))
        hi = jnp.where(below, _next_float(nearest, up=True), nearest)
        lo_w, hi_w = lo.astype(wide), hi.astype(wide)
        gap = hi_w - lo_w
        frac = jnp.where(gap > 0, (x - lo_w) / jnp.where(gap > 0, gap, jnp.ones_like(gap)),
                         jnp.zeros_like(gap))
        precise = jnp.float64 if wide == jnp.dtype(jnp.float64) else jnp.float32
        r = counter_random.uniforms(words, x.shape, precise)
        out = jnp.where(r < frac.astype(precise), hi, lo)
    special = ~jnp.isfinite(x) | ~jnp.isfinite(nearest) | ~jnp.isfinite(out)
    return jnp.where(special, nearest, out)


def _rounds(p) -> bool:
    """Whether :class:`stochastic_rounding` rounds parameter ``p`` (a dtype narrower than float32)."""
    return _is_low_precision(jnp.result_type(p), jnp.float32)


class StochasticRoundingState(NamedTuple):
    """State of :class:`stochastic_rounding`: ``key``, the raw ``uint32`` PRNG key of the next
    step (split every update; replace it to re-seed, or vmap over it), and ``streams``, one uint32
    scalar per bfloat16/float16 parameter (in ``jax.tree.leaves`` order), the number of its random
    stream: its position among the parameters' leaves, set by ``init`` and never changed. (Kept in
    the state rather than compiled into the step, so same-shaped parameters share one rounding
    loop: XLA compiles each distinct loop separately.)"""

    key: jax.Array
    streams: Any


@transform
class stochastic_rounding(Transform):
    """Apply updates to low-precision parameters with unbiased stochastic rounding.

    Put it last in the chain (after the learning rate). For each bfloat16/float16 parameter ``p``
    with incoming update ``u``:

    .. math::

        p' = \\mathrm{SR}(\\mathrm{f32}(p) + \\mathrm{f32}(u)), \\qquad
        u_{out} = \\mathrm{f32}(p') - \\mathrm{f32}(p)

    where SR is :func:`stochastic_round` (``E[p'] = p + u``), so ``apply_updates(p, u_out) == p'``
    (float32 updates, summed in float32 and rounded once; exact under the same condition as
    :class:`master_weights`). An update smaller than half the spacing of ``p``'s dtype, which
    round-to-nearest would drop every time, is applied in expectation: the parameter moves by one
    ulp with probability ``|u| / ulp``. No master copy is kept (the state is a PRNG key and 4 bytes
    per low-precision parameter), at the cost of noise of at most one ulp per step. Float32 and
    wider parameters pass through unchanged.

    ``seed``: the integer seed of the PRNG key built at ``init`` (default 0); the state holds the
    key (raw ``uint32`` data), split each update, and each bf16/f16 parameter's stream number
    (:class:`StochasticRoundingState`). Each step draws two words from the key; a parameter's random
    bits hash its stream number and each element's index with them (see
    :func:`stochastic_round`: a few integer operations per element, not a Threefry evaluation).
    The result is a pure function of the key, the stream numbers and the values. Needs ``params``.

    Optax: no equivalent. torch: no built-in (used by bf16 training recipes, e.g. in
    ``torchao``'s ``_AdamW(bf16_stochastic_round=True)``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.chain(gradtx.scale_by_learning_rate(2.0**-10),
        ...                   gradtx.stochastic_rounding(seed=0))
        >>> p = jnp.ones(10_000, jnp.bfloat16)
        >>> u, state = tx.update(jnp.ones_like(p), tx.init(p), p)
        >>> p2 = gradtx.apply_updates(p, u).astype(jnp.float32)
        >>> sorted(set(p2.tolist())), bool(abs(p2.mean() - (1 - 2.0**-10)) < 2e-4)
        ([0.99609375, 1.0], True)
    """

    seed: int = option(0)

    def _check(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**32):
            raise ValueError(f"stochastic_rounding: seed={self.seed!r} is not a valid seed; "
                             f"expected an int in [0, 2**32).")

    def init(self, params):
        # one random stream per low-precision leaf, numbered by its position among the leaves
        streams = counter_random.stream_numbers(jax.tree.leaves(params), _rounds)
        return StochasticRoundingState(jax.random.key_data(jax.random.key(self.seed)), streams)

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        key = jax.random.wrap_key_data(state.key)
        next_key, step_key = jax.random.split(key)
        step_words = counter_random.key_words(step_key)
        counter_random.check_streams(self.name, state.streams,
                                     sum(map(_rounds, jax.tree.leaves(params))),
                                     "bfloat16/float16 parameters")
        streams = iter(state.streams)

        def one(u, p):
            p = jnp.asarray(p)
            if not _rounds(p):
                return u
            target = p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
            words = counter_random.stream_words(step_words, next(streams))
            rounded = _stochastic_round_words(target, words, p.dtype)
            return rounded.astype(jnp.float32) - p.astype(jnp.float32)

        out = map_leaves(self.name, one, updates, params, names=("params",))
        return out, StochasticRoundingState(jax.random.key_data(next_key), state.streams)


# --------------------------------------------------------------------------------------------
# dynamic loss scaling


class DynamicLossScaleState(NamedTuple):
    """State of :class:`dynamic_loss_scale`.

    ``loss_scale``: float32 scalar, the scale to multiply the next loss by (read it with
    :func:`loss_scale`); ``good_steps``: int32 number of finite steps since the scale last changed
    or overflowed; ``inner_state``: the inner optimizer's state (unchanged on skipped steps);
    ``skipped``: bool, whether the latest update overflowed and was skipped.
    """

    loss_scale: jax.Array
    good_steps: jax.Array
    inner_state: Any
    skipped: jax.Array


@transform
class dynamic_loss_scale(Transform):
    """Dynamic loss scaling for float16 training, around any optimizer.

    The training loop multiplies the loss by ``S = loss_scale(state)`` before differentiating, so
    small float16 gradients do not underflow; the gradients arrive scaled by ``S``. Each update:

    1. unscale: ``ĝ = f32(g) / S`` (in float32, so a gradient the scale kept representable is not
       flushed to zero by unscaling in float16); the inner optimizer receives ``ĝ`` in float32;
    2. if every element of ``ĝ`` is finite: ``u, s_in ← inner(ĝ, s_in)`` and ``n ← n + 1``; when
       ``n`` reaches ``growth_interval``, ``S ← S · growth_factor`` (if that is finite) and
       ``n ← 0``;
    3. otherwise (overflow): the step is skipped — zero updates, the inner state returned
       bit-identical, the inner optimizer not run (``lax.cond``) — and ``S ← max(S · backoff_factor,
       min_scale)``, ``n ← 0``.

    With a power-of-two scale and factors, ``ĝ`` is exactly the unscaled gradient, so on finite
    steps this equals ``inner`` on the unscaled gradients bit for bit (float32 grads). Defaults:
    ``initial_scale=2**15``, ``growth_interval=2000``, ``growth_factor=2.0``,
    ``backoff_factor=0.5``, ``min_scale=1.0``.

    Training loop::

        def step(params, opt_state, batch):
            scale = gradtx.loss_scale(opt_state)
            def scaled_loss(p):
                return loss_fn(p, batch).astype(jnp.float32) * scale
            grads = jax.grad(scaled_loss)(params)            # scaled gradients
            updates, opt_state = tx.update(grads, opt_state, params)
            return gradtx.apply_updates(params, updates), opt_state

    torch: ``torch.amp.GradScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
    growth_interval=2000)`` with ``scaler.scale(loss)``, ``scaler.step(opt)``, ``scaler.update()``;
    here the three calls are this one transform (and the default initial scale is ``2**15``, which
    stays finite in float16). Optax core has no loss scaler; the ``jmp`` library's
    ``DynamicLossScale`` follows the same rule.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.dynamic_loss_scale(gradtx.scale_by_learning_rate(1.0),
        ...                                          initial_scale=4.0, growth_interval=2)
        >>> state = tx.init(jnp.zeros(1))
        >>> u, state = tx.update(jnp.array([jnp.inf]), state)     # overflow: skip, halve
        >>> u.tolist(), bool(state.skipped), float(gradtx.loss_scale(state))
        ([0.0], True, 2.0)
        >>> for _ in range(2):
        ...     u, state = tx.update(jnp.array([1.0]), state)     # grads scaled by 2
        >>> u.tolist(), float(gradtx.loss_scale(state))
        ([-0.5], 4.0)
    """

    inner: Any = option()
    initial_scale: float = hyperparameter(2.0**15, low=0.0, low_open=True)
    growth_interval: int = hyperparameter(2000, integer=True, low=1)
    growth_factor: float = hyperparameter(2.0, low=1.0)
    backoff_factor: float = hyperparameter(0.5, low=0.0, high=1.0, low_open=True)
    min_scale: float = hyperparameter(1.0, low=0.0, low_open=True)

    def _check(self):
        _check_member("dynamic_loss_scale", self.inner, "inner")
        values = (self.initial_scale, self.min_scale)
        if not any(_validate.is_traced(v) for v in values) and self.min_scale > self.initial_scale:
            raise ValueError(f"dynamic_loss_scale: min_scale={self.min_scale!r} is larger than "
                             f"initial_scale={self.initial_scale!r}; expected min_scale <= "
                             f"initial_scale.")

    def init(self, params):
        scale = jnp.asarray(self.initial_scale, jnp.float32)
        return DynamicLossScaleState(scale, numerics.init_count(), self.inner.init(params),
                                     jnp.zeros((), bool))

    def update(self, updates, state, params=None, **extra):
        scale = jnp.asarray(state.loss_scale, jnp.float32)

        def unscale(g):
            g = numerics.as_compute(g)
            return g / scale.astype(g.dtype)

        grads = map_leaves(self.name, unscale, updates)
        finite = all_finite(grads)

        new_updates, inner_state = update_if(finite, self.inner, grads, state.inner_state, params,
                                             extra)

        interval = jnp.asarray(self.growth_interval, jnp.int32)
        good = numerics.safe_increment(state.good_steps)
        grow = good >= interval
        grown = scale * numerics.hyper(self.growth_factor)
        grown = jnp.where(jnp.isfinite(grown), grown, scale)
        backed = jnp.maximum(scale * numerics.hyper(self.backoff_factor),
                             numerics.hyper(self.min_scale))
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), backed)
        zero = jnp.zeros((), jnp.int32)
        new_good = jnp.where(finite & ~grow, good, zero)
        return new_updates, DynamicLossScaleState(new_scale, new_good, inner_state, ~finite)


def loss_scale(state) -> jax.Array:
    """The current loss scale (float32 scalar) held by :class:`dynamic_loss_scale` in ``state``.

    ``state`` is the state of any optimizer containing one loss scaler (possibly inside a chain or
    another wrapper). Multiply the loss by it before differentiating.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.dynamic_loss_scale(gradtx.scale_by_learning_rate(0.1))
        >>> float(gradtx.loss_scale(tx.init(jnp.zeros(2))))
        32768.0
    """
    nodes = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, DynamicLossScaleState))
             if isinstance(x, DynamicLossScaleState)]
    if not nodes:
        raise ValueError("loss_scale: the state holds no dynamic_loss_scale state; wrap the "
                         "optimizer in gradtx.dynamic_loss_scale(...).")
    if len(nodes) > 1:
        raise ValueError(f"loss_scale: the state holds {len(nodes)} dynamic_loss_scale states; "
                         f"read the one you mean directly (state.loss_scale).")
    return nodes[0].loss_scale
