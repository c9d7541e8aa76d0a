"""Sign-based primitives: signSGD's ``sign(g)`` and Lion's signed interpolated momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import compiler, numerics
from gradtx.base import EmptyState, Transform, hyperparameter, option, transform
from gradtx.tree import keystr, map_leaves, zeros_like

__all__ = ["scale_by_sign", "scale_by_lion", "ScaleByLionState"]


def _reject_complex(owner: str, updates) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"{owner}: the update at {keystr(path)} is complex ({jnp.result_type(leaf)}); the "
                f"sign of a complex number is not a descent direction. Split complex parameters "
                f"into real and imaginary parts, or use a different transform for them.")


def _finite_sign(u):
    """``sign(u)`` where ``u`` is finite; ``u`` itself (NaN, ±Inf) where it is not."""
    return jnp.where(jnp.isfinite(u), jnp.sign(u), u)


@transform
class scale_by_sign(Transform):
    """signSGD: replace each update by its elementwise sign, ``u ← sign(g)`` (in ``{-1, 0, 1}``).

    Stateless. Updates keep their dtype; ``sign(0) = 0``. Non-finite inputs are passed through
    unchanged (NaN stays NaN, ±Inf stays ±Inf) instead of becoming ±1: an overflowed gradient must
    not turn into an ordinary-looking step (use :class:`gradtx.skip_nonfinite` to skip such steps).
    Complex updates raise ``TypeError`` (the sign of a complex number is not defined as a
    direction).
    Optax: ``optax.scale_by_sign()``. torch has no built-in signSGD.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_sign()
        >>> tx.update(jnp.array([3.0, -0.5, 0.0]), tx.init(None))[0].tolist()
        [1.0, -1.0, 0.0]
    """

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        _reject_complex(self.name, updates)
        return map_leaves(self.name, _finite_sign, updates), state


class ScaleByLionState(NamedTuple):
    """State of :class:`scale_by_lion`: the momentum ``m`` (one buffer: half of Adam's memory)."""

    mu: Any


@transform
class scale_by_lion(Transform):
    """Lion's update direction (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    With ``m_0 = 0``::

        u_t = sign(β₁ · m_{t-1} + (1 - β₁) · g_t)
        m_t = β₂ · m_{t-1} + (1 - β₂) · g_t

    The update interpolates with ``β₁`` but the momentum is tracked with ``β₂`` (no bias
    correction). Defaults: ``b1=0.9``, ``b2=0.99`` (the paper's), both in ``[0, 1]``;
    ``mu_dtype=None`` stores ``m`` in each parameter's dtype (arithmetic in float32 or wider).
    Lion alone is ``chain(scale_by_lion(), add_decoupled_weight_decay(λ),
    scale_by_learning_rate(γ))`` (see :func:`gradtx.lion`); the paper recommends a learning rate
    3-10x smaller and a decay 3-10x larger than for AdamW. Complex updates raise ``TypeError``.

    Evaluation: when ``0 < β₁ < β₂`` are Python numbers (the defaults, and every published setting)
    and ``m`` is stored in its compute dtype (float32 for float32 parameters), the direction is
    computed from the *new* moment, ``u_t = sign(β₁ · m_t + (β₂ - β₁) · g_t)``, which is
    ``sign(β₂ · (β₁ · m_{t-1} + (1 - β₁) · g_t))``: the same sign. The old moment is then dead once
    ``m_t`` is written, so a jitted step with donated state updates ``m`` in place; reading the old
    moment makes XLA copy the donated buffer first (3x slower on a 16M-element leaf on CPU). The
    two orders round differently, so they can disagree only where ``β₁m + (1-β₁)g`` is within a few
    float32 ulps of ``|m| + |g|`` of zero, where its sign is rounding noise in either order (as it is
    between two XLA fusions of the literal formula). Non-finite values give the literal formula's
    result. Otherwise (traced ``β``, ``β₁ ≥ β₂``, ``β₁ = 0``, or a moment rounded on storage, e.g.
    ``mu_dtype="bfloat16"`` or bfloat16 parameters) the literal formula is used, and also where
    the compiler merges sibling loops (XLA's CPU backend under :func:`gradtx.xla_flags`): there the
    literal formula's two loops, both reading the old moment, become one.

    Optax: ``optax.scale_by_lion(b1, b2, mu_dtype)`` in its default ``"hard"`` mode (same math,
    literal evaluation; Optax's state also keeps an unused step count). torch has no built-in Lion.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_lion(b1=0.5, b2=0.5)
        >>> u, state = tx.update(jnp.array([4.0, -2.0]), tx.init(jnp.zeros(2)))
        >>> u.tolist(), state.mu.tolist()
        ([1.0, -1.0], [2.0, -1.0])
    """

    b1: float = hyperparameter(0.9, low=0.0, high=1.0)
    b2: float = hyperparameter(0.99, low=0.0, high=1.0)
    mu_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return ScaleByLionState(zeros_like(params, self.mu_dtype))

    def _direction_from_new_momentum(self) -> bool:
        """Whether ``0 < β₁ < β₂`` holds for Python-number ``β₁``, ``β₂`` (known when traced)."""
        b1, b2 = self.b1, self.b2
        return isinstance(b1, (int, float)) and isinstance(b2, (int, float)) and 0.0 < b1 < b2

    def update(self, updates, state, params=None, **extra):
        del params, extra
        _reject_complex(self.name, updates)
        b1 = numerics.value_at(self.b1, None)
        b2 = numerics.value_at(self.b2, None)
        # Where the compiler merges sibling loops (gradtx.xla_flags("cpu")), reading the old
        # moment is better: the direction and m' loops then merge into one.
        from_new = (self._direction_from_new_momentum()
                    and not compiler._update_from_old_state())

        def one(g, m):
            ct = numerics.compute_dtype(g.dtype)
            g32, m32 = numerics.as_compute(g), m.astype(ct)
            c1, c2 = b1.astype(ct), b2.astype(ct)
            new_m = c2 * m32 + (1.0 - c2) * g32
            if from_new and m.dtype == ct:
                # β₂·(β₁m + (1-β₁)g) = β₁m' + (β₂-β₁)g: the same sign, read from the new moment
                # (which is stored unrounded), so the old one is dead once m' is written.
                direction = jnp.sign(c1 * new_m + (c2 - c1) * g32)
            else:
                direction = jnp.sign(c1 * m32 + (1.0 - c1) * g32)
            return direction.astype(g.dtype), new_m.astype(m.dtype)

        out, mu = map_leaves(self.name, one, updates, state.mu, names=("mu",), outputs=2)
        return out, ScaleByLionState(mu)
