"""Clipping primitives: elementwise, by global norm, by per-leaf RMS, and adaptive (AGC)."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import numerics
from gradtx.base import EmptyState, Transform, hyperparameter, option, transform
from gradtx.tree import global_norm, keystr, map_leaves

__all__ = ["clip", "clip_by_global_norm", "clip_by_block_rms", "adaptive_grad_clip"]


def _scale(u, factor):
    """``u · factor`` in the compute dtype, cast back to ``u``'s dtype (factor: a scalar array)."""
    ct = numerics.compute_dtype(u.dtype)
    return (numerics.as_compute(u) * factor.astype(ct)).astype(u.dtype)


def _shrink_factor(norm, limit):
    """``limit / norm`` where ``norm > limit``, else 1; never divides by zero (norm's dtype)."""
    over = norm > limit
    safe = jnp.where(over, norm, jnp.ones_like(norm))
    return jnp.where(over, limit / safe, jnp.ones_like(norm))


@transform
class clip(Transform):
    """Clip every update element to ``[-max_delta, max_delta]``: ``u ← min(max(u, -c), c)``.

    ``max_delta`` (``c``) is ``>= 0``. For complex updates the modulus is clipped and the phase
    kept. Stateless; updates keep their dtype. Optax: ``optax.clip(max_delta)``; torch:
    ``torch.nn.utils.clip_grad_value_(params, clip_value=c)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip(1.0)
        >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))[0].tolist()
        [-1.0, 0.5, 1.0]
    """

    max_delta: float = hyperparameter(low=0.0)

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        c = numerics.value_at(self.max_delta, None)

        def one(u):
            x = numerics.as_compute(u)
            if jnp.iscomplexobj(x):
                factor = _shrink_factor(jnp.abs(x), c)
                return (x * factor.astype(x.dtype)).astype(u.dtype)
            limit = c.astype(x.dtype)
            return jnp.clip(x, -limit, limit).astype(u.dtype)

        return map_leaves(self.name, one, updates), state


@transform
class clip_by_global_norm(Transform):
    """Rescale all updates together so that their global L2 norm is at most ``max_norm``.

    With ``n = sqrt(Σ_leaves Σ |u|²)`` (accumulated in float32, see
    :func:`gradtx.tree.global_norm`)::

        u ← u · c / n   if n > c   else   u

    so the output norm is ``min(n, c)`` up to the final rounding to each update's dtype. Updates
    below the threshold are returned unchanged; all-zero updates stay zero (no NaN).
    ``max_norm`` (``c``) is ``>= 0``. Stateless. Non-finite gradients give a non-finite norm and
    non-finite updates (as in torch); guard them with a skip-non-finite wrapper.
    Optax: ``optax.clip_by_global_norm(max_norm)``. torch:
    ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (torch scales by ``c / (n + 1e-6)``
    whenever that is below 1, so its output is very slightly smaller).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip_by_global_norm(1.0)
        >>> u, _ = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(None))
        >>> u["a"].tolist(), u["b"].tolist()
        ([0.6000000238418579], [0.800000011920929])
    """

    max_norm: float = hyperparameter(low=0.0)

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        # The norm reads the updates on their own (see numerics.unshared): a float32
        # conversion of a bfloat16 leaf shared with the scaling loop would be materialised.
        norm = global_norm(numerics.unshared(updates))  # float32 (float64 when a leaf is float64)
        factor = _shrink_factor(norm, numerics.value_at(self.max_norm, None).astype(norm.dtype))
        return map_leaves(self.name, lambda u: _scale(u, factor), updates), state


@transform
class clip_by_block_rms(Transform):
    """Clip each leaf (block) to a root-mean-square of at most ``threshold``.

    Per leaf, with ``rms = sqrt(mean(|u|²))`` (float32)::

        u ← u / max(1, rms / threshold)

    ``threshold`` is ``> 0``. Leaves below the threshold are unchanged; zero leaves stay zero.
    Stateless. Optax: ``optax.clip_by_block_rms(threshold)`` (same definition). torch has no
    equivalent. Adafactor's update clipping is this rule applied to its scaled update.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.clip_by_block_rms(1.0)
        >>> tx.update({"w": jnp.array([4.0, -4.0]), "b": jnp.array([0.5])}, tx.init(None))[0]
        {'b': Array([0.5], dtype=float32), 'w': Array([ 1., -1.], dtype=float32)}
    """

    threshold: float = hyperparameter(low=0.0, low_open=True)

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        threshold = numerics.value_at(self.threshold, None)

        def one(u):
            x = numerics.as_compute(numerics.unshared(u))   # the RMS reads u on its own
            if x.size == 0:
                return u
            rms = jnp.sqrt(jnp.mean(numerics.abs_sq(x))).astype(jnp.float32)
            return _scale(u, 1.0 / jnp.maximum(1.0, rms / threshold))

        return map_leaves(self.name, one, updates), state


def _check_axis(owner: str, axis):
    if axis is None:
        return None
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    for a in items:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Integral):
            raise TypeError(f"{owner}: axis={axis!r} must be None, an int or a tuple of ints "
                            f"(the axes each unit's norm reduces over).")
    if isinstance(axis, (tuple, list)):
        if not axis:
            raise ValueError(f"{owner}: axis=() reduces over nothing; pass None for the default "
                             f"units or at least one axis.")
        return tuple(int(a) for a in axis)
    return int(axis)


def _unit_axes(owner: str, path, ndim: int, axis):
    """The axes a unit's norm reduces over for a leaf of rank ``ndim``."""
    if ndim <= 1:
        return tuple(range(ndim))
    if axis is None:
        return tuple(range(ndim - 1))
    axes = axis if isinstance(axis, tuple) else (axis,)
    normalised = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{owner}: axis={axis!r} is out of range for the {ndim}-D leaf at "
                             f"{keystr(path)}; give axes valid for every leaf of rank >= 2, or "
                             f"apply adaptive_grad_clip to groups of leaves with gradtx.partition.")
        normalised.append(a % ndim)
    return tuple(sorted(set(normalised)))


@transform
class adaptive_grad_clip(Transform):
    """Adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization"), unit-wise.

    For each *unit* ``i`` of each leaf, with ``G_i`` the update and ``W_i`` the parameter slice::

        ‖W_i‖* = max(‖W_i‖, eps)
        G_i ← G_i · λ‖W_i‖* / ‖G_i‖   if ‖G_i‖ > λ‖W_i‖*   else   G_i

    with ``λ = clipping`` (default ``0.01``, ``> 0``) and ``eps`` (default ``1e-3``, ``>= 0``; it
    keeps zero-initialised parameters from freezing). Norms are Frobenius norms in float32.

    **Units.** The paper computes the norm of each *output unit*: a row of an ``(out, in)``
    fully-connected weight, or the fan-in (input channels x receptive field) of one conv filter.
    JAX/Flax stores kernels output-last (``(in, out)``, ``(h, w, in, out)``, ``(d, h, w, in, out)``),
    so by default (``axis=None``) a unit of a leaf of rank >= 2 is one index along the *last* axis
    and the norm reduces over all other axes. Scalars and vectors (biases, norm scales) form a single
    unit. Pass ``axis`` (an int or tuple of ints: the axes each unit's norm reduces over, applied to
    every leaf of rank >= 2) for other layouts, e.g. ``axis=1`` for torch's ``(out, in)`` linear
    weights. The paper leaves the final classifier layer unclipped: exclude it with
    :class:`gradtx.masked`.

    Needs ``params``. Stateless. Updates keep their dtype; zero updates stay zero (no NaN).
    Optax: ``optax.adaptive_grad_clip(clipping, eps, axis)`` uses the same units for rank 2, 4 and 5
    but reduces only over axis 0 for rank-3 leaves (multi-head projections), where gradtx's default
    reduces over axes 0 and 1 (pass ``axis=0`` to match). torch has no built-in AGC.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adaptive_grad_clip(clipping=0.5, eps=0.5)
        >>> params = jnp.array([[3.0, 0.0], [4.0, 0.0]])    # column norms: 5 and 0 (-> eps)
        >>> grads = jnp.array([[0.0, 1.0], [8.0, 0.0]])     # column norms: 8 and 1
        >>> u, _ = tx.update(grads, tx.init(params), params)
        >>> u.tolist()                                      # limits: 0.5·5 and 0.5·0.5
        [[0.0, 0.25], [2.5, 0.0]]
    """

    clipping: float = hyperparameter(0.01, low=0.0, low_open=True)
    eps: float = hyperparameter(1e-3, low=0.0)
    axis: Any = option(None)

    def _check(self):
        object.__setattr__(self, "axis", _check_axis(self.name, self.axis))

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        clipping = numerics.value_at(self.clipping, None)
        eps = numerics.value_at(self.eps, None)
        paths = iter([p for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]])

        def unit_norm(x, axes):
            x = numerics.as_compute(x)
            sq = jnp.sum(numerics.abs_sq(x), axis=axes, keepdims=True)
            return jnp.sqrt(sq).astype(jnp.float32)

        def one(g, p):
            axes = _unit_axes(self.name, next(paths), g.ndim, self.axis)
            # each norm reads its array on its own (see numerics.unshared)
            limit = clipping * jnp.maximum(unit_norm(numerics.unshared(p), axes), eps)
            return _scale(g, _shrink_factor(unit_norm(numerics.unshared(g), axes), limit))

        return map_leaves(self.name, one, updates, params, names=("params",)), state
