"""Scaling primitives: a constant factor, the learning rate (the one sign flip), a schedule."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from gradtx import numerics
from gradtx.base import EmptyState, Transform, hyperparameter, transform
from gradtx.tree import map_leaves

__all__ = ["scale", "scale_by_learning_rate", "scale_by_schedule", "ScheduleState"]


class ScheduleState(NamedTuple):
    """State of the schedule-driven scalings: the number of updates done so far (int32)."""

    count: jax.Array


def _scaled(owner: str, updates, factor: jax.Array):
    def one(u):
        return (numerics.as_compute(u) * factor.astype(numerics.compute_dtype(u.dtype))).astype(u.dtype)
    return map_leaves(owner, one, updates)


@transform
class scale(Transform):
    """Multiply updates by a constant: ``u ← factor · u``.

    ``factor`` is any finite real number (negative flips the direction). Updates keep their dtype;
    the product is computed in float32 for narrower dtypes. Stateless.
    Optax: ``optax.scale(step_size)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale(0.5)
        >>> tx.update(jnp.array([2.0, 4.0]), tx.init(None))[0].tolist()
        [1.0, 2.0]
    """

    factor: float = hyperparameter()

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        return _scaled(self.name, updates, numerics.value_at(self.factor, None)), state


@transform
class scale_by_learning_rate(Transform):
    """Descend: ``u ← -γ_t · u`` with ``γ_t`` a float or a schedule evaluated at the step count.

    This is the only place in gradtx where the sign flips from ascent direction to update.
    ``learning_rate`` must be ``>= 0`` (a float) or a schedule (any callable ``step -> value``;
    step 0 is the first update). The state always holds the step count, whether the rate is a
    float or a schedule, so the state structure never depends on that choice.
    Optax: ``optax.scale_by_learning_rate``; torch: the ``lr`` of every optimizer.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_learning_rate(0.25)
        >>> u, state = tx.update(jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2)))
        >>> u.tolist(), int(state.count)
        ([-0.25, 0.5], 1)
    """

    learning_rate: Any = hyperparameter(low=0.0, schedule=True)

    def init(self, params):
        del params
        return ScheduleState(numerics.init_count())

    def update(self, updates, state, params=None, **extra):
        del params, extra
        lr = numerics.value_at(self.learning_rate, state.count)
        return _scaled(self.name, updates, -lr), ScheduleState(numerics.safe_increment(state.count))


@transform
class scale_by_schedule(Transform):
    """Multiply updates by a schedule's value: ``u ← s(t) · u`` (no sign flip).

    ``step_size_fn`` is a schedule (a callable ``step -> value``) or a constant; step 0 is the first
    update. Use it for a multiplier schedule ``η_t`` on top of a fixed learning rate (the AdamW
    paper's notation). Optax: ``optax.scale_by_schedule``; torch: ``LambdaLR``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_schedule(gradtx.schedules.constant(0.5))
        >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0].tolist()
        [1.0]
    """

    step_size_fn: Any = hyperparameter(schedule=True)

    def init(self, params):
        del params
        return ScheduleState(numerics.init_count())

    def update(self, updates, state, params=None, **extra):
        del params, extra
        factor = numerics.value_at(self.step_size_fn, state.count)
        return (_scaled(self.name, updates, factor),
                ScheduleState(numerics.safe_increment(state.count)))
