"""Adafactor's pieces (Shazeer & Stern 2018): the factored second moment and the parameter scale.

Adafactor is a chain of primitives::

    chain(scale_by_factored_rms(),               # G / √V̂ (factored V̂), clipped to RMS <= d
          scale_by_learning_rate(schedule),      # e.g. min(1e-2, 1/√t): the relative step size
          scale_by_param_block_rms())            # × max(ε₂, RMS(p))

which is ``optax.adafactor(learning_rate, multiply_by_parameter_scale=True)`` (without momentum
or weight decay, which are further links of the chain).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import numerics
from gradtx.base import EmptyState, Transform, hyperparameter, option, transform
from gradtx.transforms.adaptive import _compute, _divide, _load, _Hypers, _real_dtype
from gradtx.tree import TreeMismatchError, map_leaves

__all__ = ["scale_by_factored_rms", "scale_by_param_block_rms", "ScaleByFactoredRmsState"]


class ScaleByFactoredRmsState(NamedTuple):
    """State of :class:`scale_by_factored_rms`.

    ``count`` (int32) is the number of updates done. ``v_row``, ``v_col`` and ``v`` are trees with
    the parameters' structure. For a factored leaf of shape ``S`` with factored axes ``i < j``,
    ``v_row`` has shape ``S`` without axis ``j`` (the mean over ``j``: row statistics of a matrix),
    ``v_col`` has shape ``S`` without axis ``i``, and ``v`` is an unused scalar zero. For any other
    leaf, ``v`` has the leaf's shape and ``v_row``/``v_col`` are unused scalar zeros (scalars, not
    empty arrays, so checkpointers that refuse zero-size arrays can save the state).
    All are real and stored in ``nu_dtype``.
    """

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def _factored_axes(shape: tuple, factored: bool, min_dim: int):
    """The two axes ``(i, j)``, ``i < j``, to factor over, or None to keep a full second moment.

    The two largest dimensions (ties go to later axes), provided the smaller of them is at least
    ``min_dim``: the rule of Optax and Mesh-TensorFlow.
    """
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    a, b = int(order[-2]), int(order[-1])
    if shape[a] < min_dim:
        return None
    return (a, b) if a < b else (b, a)


def _empty(dtype) -> jax.Array:
    return jnp.zeros((), dtype)


def _sq_plus(g, eps):
    """``|G|² + ε₁`` in the compute dtype."""
    return numerics.abs_sq(_compute(g)[0]) + eps


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(numerics.abs_sq(x)))


@transform
class scale_by_factored_rms(Transform):
    r"""Adafactor's update: the gradient over a factored root-mean-square, then clipped.

    With ``t >= 1`` the step and ``β̂_t = 1 - t^{-c}`` (``c = decay_rate``; ``β̂_1 = 0``, so the
    first statistics are the first gradient's):

    * a leaf whose two largest dimensions are both ``>= min_dim_size_to_factor`` keeps the row and
      column means ``R, C`` of ``G² + ε₁`` over those two axes (for a matrix: ``R_i = mean_j``,
      ``C_j = mean_i``), each as an exponential average with ``β̂_t``, and uses the rank-1
      estimate ``V̂ = R Cᵀ / mean(R)`` — ``O(n + m)`` memory instead of ``O(nm)``;
    * every other leaf (vectors, scalars, small matrices, or ``factored=False``) keeps a full
      ``V = β̂_t V + (1 - β̂_t)(G² + ε₁)``;
    * ``U = G / √V̂``, then update clipping ``U / max(1, RMS(U)/d)`` with ``d = clipping_threshold``
      (per leaf; ``None`` disables it).

    Defaults are the paper's and Optax's: ``decay_rate=0.8``, ``epsilon=1e-30`` (ε₁),
    ``clipping_threshold=1.0``, ``min_dim_size_to_factor=128``. Which axes are factored follows
    Optax (the two largest, ties to later axes; other axes are batch axes), not the "last two"
    of the paper's tensor2tensor code; ``V̂`` does not depend on which of the two is called the
    row. Relation to Optax: ``optax.scale_by_factored_rms`` followed by
    ``optax.clip_by_block_rms(d)`` (Optax keeps clipping separate; here ``clipping_threshold=None``
    gives Optax's primitive alone). Optax's ``step_offset``/``decay_rate_fn`` are not offered; the
    relative step size ``min(1e-2, 1/√t)`` is a learning-rate schedule and the parameter scale is
    :class:`scale_by_param_block_rms`. ``decay_rate`` is in ``(0, 1]`` (``c ≤ 1`` keeps forgetting
    old gradients; 1 is the plain average), ``epsilon > 0``, ``clipping_threshold > 0`` or None.
    Statistics are stored in ``nu_dtype`` (default: the parameter's dtype) and floored at the
    smallest normal float32 after loading, so a low-precision store that underflowed cannot divide
    by zero. Complex gradients use ``|G|²``. Params are not needed. State:
    :class:`ScaleByFactoredRmsState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_factored_rms(min_dim_size_to_factor=2)
        >>> state = tx.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
        >>> [state.v_row["w"].shape, state.v_col["w"].shape, state.v["w"].shape, state.v["b"].shape]
        [(2,), (3,), (), (3,)]
        >>> u, state = tx.update({"w": jnp.full((2, 3), 3.0), "b": jnp.array([2.0, -2.0, 0.5])}, state)
        >>> [round(x, 4) for x in u["w"].ravel().tolist()], [round(x, 4) for x in u["b"].tolist()]
        ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0])
    """

    factored: bool = option(True, kind="bool")
    decay_rate: float = hyperparameter(0.8, low=0.0, high=1.0, low_open=True)
    epsilon: float = hyperparameter(1e-30, low=0.0, low_open=True)
    clipping_threshold: float | None = hyperparameter(1.0, low=0.0, low_open=True,
                                                      allow_none=True)
    min_dim_size_to_factor: int = option(128)
    nu_dtype: Any = option(None, kind="dtype")

    def _check(self):
        m = self.min_dim_size_to_factor
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(
                f"{self.name}: min_dim_size_to_factor={m!r} must be a positive int (it decides "
                f"the state's shapes, so it cannot be traced or scheduled); e.g. 128.")
        object.__setattr__(self, "min_dim_size_to_factor", int(m))

    def _axes(self, shape):
        return _factored_axes(tuple(shape), self.factored, self.min_dim_size_to_factor)

    def init(self, params):
        def one(p):
            shape = tuple(jnp.shape(p))
            dtype = _real_dtype(numerics.state_dtype(self.nu_dtype, p))
            axes = self._axes(shape)
            if axes is None:
                return _empty(dtype), _empty(dtype), jnp.zeros(shape, dtype)
            i, j = axes
            row = jnp.zeros(shape[:j] + shape[j + 1:], dtype)
            col = jnp.zeros(shape[:i] + shape[i + 1:], dtype)
            return row, col, _empty(dtype)

        leaves, treedef = jax.tree.flatten(params)
        parts = [one(p) for p in leaves]
        rows, cols, fulls = ([treedef.unflatten([x[k] for x in parts])] for k in range(3))
        return ScaleByFactoredRmsState(numerics.init_count(), rows[0], cols[0], fulls[0])

    def _check_shapes(self, updates, state):
        """Each leaf's statistics must have the shapes this leaf's init gives (error names the path)."""
        treedef = jax.tree.structure(updates)
        if any(jax.tree.structure(t) != treedef for t in (state.v, state.v_row, state.v_col)):
            return  # a structure mismatch: map_leaves reports it with the first differing path
        leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
        stats = [jax.tree.leaves(tree) for tree in (state.v, state.v_row, state.v_col)]
        for (path, g), full, row, col in zip(leaves, *stats):
            shape = tuple(jnp.shape(g))
            axes = self._axes(shape)
            if axes is None:
                expected = (shape, (), ())
            else:
                i, j = axes
                expected = ((), shape[:j] + shape[j + 1:], shape[:i] + shape[i + 1:])
            got = (tuple(jnp.shape(full)), tuple(jnp.shape(row)), tuple(jnp.shape(col)))
            if got != expected:
                raise TreeMismatchError(
                    f"{self.name}: the update at {jax.tree_util.keystr(path)} has shape {shape} "
                    f"and needs statistics of shapes v={expected[0]}, v_row={expected[1]}, "
                    f"v_col={expected[2]}, but the state has {got[0]}, {got[1]}, {got[2]}; was "
                    f"the state initialised with different parameters?")

    def update(self, updates, state, params=None, **extra):
        del params, extra
        h = _Hypers(self)
        count = numerics.safe_increment(state.count)
        t = count.astype(jnp.float32)
        # β̂_t = 1 - t^{-c}; 1 - β̂_t = t^{-c} = exp(-c log t).
        c = numerics.hyper(self.decay_rate)
        new_weight = jnp.exp(-c * jnp.log(t))
        beta = 1.0 - new_weight

        def one(g, row, col, full):
            # Every parameter-sized use of G (row means, column means, clipping RMS, update)
            # reads G in its own fused loop: see numerics.unshared. No temporary is materialised.
            rd = _compute(g)[2]
            axes = self._axes(tuple(g.shape))
            tiny = jnp.asarray(jnp.finfo(rd).tiny, rd)
            w, b = new_weight.astype(rd), beta.astype(rd)
            eps = h("epsilon", rd)

            if axes is None:
                v_new = b * _load(full, rd) + w * _sq_plus(g, eps)
                new = (row, col, v_new.astype(full.dtype))

                def direction(g, v_new, tiny):
                    return _divide(_compute(g)[0], jnp.sqrt(jnp.maximum(v_new, tiny)))
                inputs = (g, v_new, tiny)
            else:
                i, j = axes
                # each reduction reads G and ε₁ through its own barrier tuple (ε₁ first for the
                # rows): a broadcast of ε₁ shared by equal-shaped leaves would be materialised
                row_sq = _sq_plus(*reversed(numerics.unshared((eps, g))))
                row_new = b * _load(row, rd) + w * jnp.mean(row_sq, axis=j)
                col_sq = _sq_plus(*numerics.unshared((g, eps)))
                col_new = b * _load(col, rd) + w * jnp.mean(col_sq, axis=i)
                r = jnp.maximum(row_new, tiny)
                # V̂ = R Cᵀ / mean(R): mean over the axis of R that stands for axis i.
                r_norm = r / jnp.mean(r, axis=i, keepdims=True)
                row_factor = jax.lax.rsqrt(jnp.expand_dims(r_norm, j))
                col_factor = jax.lax.rsqrt(jnp.expand_dims(jnp.maximum(col_new, tiny), i))
                new = (row_new.astype(row.dtype), col_new.astype(col.dtype), full)

                def direction(g, row_factor, col_factor):
                    gc = _compute(g)[0]
                    return gc * (row_factor * col_factor).astype(gc.dtype)
                inputs = (g, row_factor, col_factor)
            # Each use of G gets its own expression (a different barrier tuple per use): with
            # bfloat16 leaves a shared float32 conversion of G would be materialised otherwise.
            u = direction(*numerics.unshared(inputs[:2]), *inputs[2:])
            if self.clipping_threshold is not None and g.size > 0:
                d = h("clipping_threshold", rd)
                rms = _rms(direction(*numerics.unshared(inputs)))
                u = _divide(u, jnp.maximum(jnp.ones((), rd), rms / d))
            return (u.astype(g.dtype),) + new

        self._check_shapes(updates, state)
        updates, rows, cols, fulls = map_leaves(
            self.name, one, updates, state.v_row, state.v_col, state.v,
            names=("v_row", "v_col", "v"), outputs=4, same_shape=False)
        return updates, ScaleByFactoredRmsState(count, rows, cols, fulls)


@transform
class scale_by_param_block_rms(Transform):
    r"""Scale each leaf's update by its parameter's root-mean-square: ``u ← max(ε₂, RMS(p))·u``.

    ``RMS(p) = √(mean |p|²)`` over the whole leaf; ``ε₂ = min_scale`` (default ``1e-3``, the
    paper's) keeps zero-initialised parameters moving. This is the "relative step size" half of
    Adafactor (Shazeer & Stern 2018, §8): with :class:`scale_by_factored_rms` and a learning-rate
    schedule it makes Adafactor. Equal to ``optax.scale_by_param_block_rms(min_scale)``.
    ``min_scale >= 0``; with 0 a leaf whose parameters are all zero never moves. Needs ``params``.
    Stateless (:class:`gradtx.EmptyState`).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_param_block_rms()
        >>> params = {"w": jnp.array([3.0, -4.0, 0.0, 0.0]), "b": jnp.zeros(2)}
        >>> u, _ = tx.update({"w": jnp.ones(4), "b": jnp.ones(2)}, tx.init(params), params)
        >>> u["w"].tolist(), [round(x, 6) for x in u["b"].tolist()]
        ([2.5, 2.5, 2.5, 2.5], [0.001, 0.001])
    """

    min_scale: float = hyperparameter(1e-3, low=0.0)

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        h = _Hypers(self)

        def one(u, p):
            if u.size == 0:
                return u
            uc, _, rd = _compute(u)
            pc = numerics.as_compute(numerics.unshared(p))
            scale = jnp.maximum(_rms(pc).astype(rd), h("min_scale", rd))
            return (uc * scale.astype(uc.dtype)).astype(u.dtype)

        return map_leaves(self.name, one, updates, params, names=("params",)), state
