"""Reduce the step size when a monitored value (the loss) stops improving."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx import numerics
from gradtx.base import Transform, hyperparameter, option, transform
from gradtx.transforms.scaling import _scaled

__all__ = ["reduce_on_plateau", "ReduceOnPlateauState"]


class ReduceOnPlateauState(NamedTuple):
    """State of :class:`reduce_on_plateau` (all float32/int32 scalars).

    ``scale``: the multiplier applied to the next update (starts at 1). ``best_value``: the best
    monitored value so far (``+inf``/``-inf`` before the first). ``plateau_count``: evaluations in a
    row without improvement (torch's ``num_bad_epochs``). ``cooldown_count``: evaluations left in
    the cool-down (torch's ``cooldown_counter``). ``accumulated_value`` / ``accumulation_count``: the
    running sum of values and their number since the last evaluation.
    """

    scale: jax.Array
    best_value: jax.Array
    plateau_count: jax.Array
    cooldown_count: jax.Array
    accumulated_value: jax.Array
    accumulation_count: jax.Array


@transform
class reduce_on_plateau(Transform):
    """Multiply updates by a scale that drops by ``factor`` when the loss plateaus.

    ``update(updates, state, value=loss)`` reads the monitored value from its keyword arguments
    (``value`` is required; a ``ValueError`` says so when it is missing). Semantics are torch's
    ``ReduceLROnPlateau`` with the learning rate replaced by a scale starting at 1 (put this
    transform after ``scale_by_learning_rate``, or before it: the scale multiplies):

    - every ``accumulation_size`` updates the mean of the values seen is *evaluated* (default 1:
      every update, like calling ``scheduler.step(loss)`` every step);
    - it *improves* on ``best`` when ``v < best·(1 - threshold)`` (``mode="min"``,
      ``threshold_mode="rel"``), ``v < best - threshold`` (min, abs), ``v > best·(1 + threshold)``
      (max, rel) or ``v > best + threshold`` (max, abs); then ``best = v`` and ``plateau_count = 0``,
      otherwise ``plateau_count += 1``; a NaN value never improves;
    - during a cool-down (``cooldown_count > 0``) the count decrements and ``plateau_count`` is reset;
    - when ``plateau_count > patience``: ``scale ← max(scale·factor, min_scale)`` (skipped when the
      change is not larger than ``eps``), ``cooldown_count = cooldown``, ``plateau_count = 0``.

    **Alignment (as torch):** the update is multiplied by the scale *before* the value passed with it
    is evaluated; the new scale applies from the next update. This is torch's loop
    ``loss.backward(); optimizer.step(); scheduler.step(loss)``: the loss computed at the current
    parameters affects only later steps. (Optax's ``contrib.reduce_on_plateau`` applies the new
    scale to the same update.)

    Defaults are torch's: ``factor=0.1`` (``0 <= factor < 1``), ``patience=10``,
    ``threshold=1e-4``, ``threshold_mode="rel"``, ``cooldown=0``, ``mode="min"``,
    ``eps=1e-8``; ``min_scale=0.0``. torch's ``min_lr=m`` with initial learning rate ``γ`` is
    ``min_scale=m/γ``, its ``eps=ε`` is ``eps=ε/γ``. State: :class:`ReduceOnPlateauState`
    (``state.scale`` is the current multiplier, readable for logging).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.reduce_on_plateau(factor=0.5, patience=1)
        >>> state = tx.init(jnp.zeros(1))
        >>> applied = []
        >>> for loss in [3.0, 2.0, 2.0, 2.0, 2.0, 2.0]:
        ...     u, state = tx.update(jnp.ones(1), state, value=loss)
        ...     applied.append(u.tolist()[0])
        >>> applied, state.scale.tolist()
        ([1.0, 1.0, 1.0, 1.0, 0.5, 0.5], 0.25)
    """

    factor: float = hyperparameter(0.1, low=0.0, high=1.0, high_open=True)
    patience: int = hyperparameter(10, low=0, integer=True, high=numerics.INT32_MAX - 1)
    threshold: float = hyperparameter(1e-4, low=0.0)
    threshold_mode: str = option("rel", choices=("rel", "abs"))
    cooldown: int = hyperparameter(0, low=0, integer=True, high=numerics.INT32_MAX)
    min_scale: float = hyperparameter(0.0, low=0.0, high=1.0)
    mode: str = option("min", choices=("min", "max"))
    accumulation_size: int = hyperparameter(1, low=1, integer=True, high=numerics.INT32_MAX)
    eps: float = hyperparameter(1e-8, low=0.0)

    def init(self, params):
        del params
        worst = jnp.inf if self.mode == "min" else -jnp.inf
        # one fresh buffer per field: a shared one could not be donated with the state
        return ReduceOnPlateauState(
            scale=jnp.ones((), jnp.float32), best_value=jnp.asarray(worst, jnp.float32),
            plateau_count=jnp.zeros((), jnp.int32), cooldown_count=jnp.zeros((), jnp.int32),
            accumulated_value=jnp.zeros((), jnp.float32),
            accumulation_count=jnp.zeros((), jnp.int32))

    def _improves(self, value, best):
        thr = jnp.asarray(self.threshold, jnp.float32)
        if self.mode == "min":
            bound = best * (1 - thr) if self.threshold_mode == "rel" else best - thr
            return value < bound
        bound = best * (1 + thr) if self.threshold_mode == "rel" else best + thr
        return value > bound

    def update(self, updates, state, params=None, **extra):
        del params
        if "value" not in extra or extra["value"] is None:
            raise ValueError(
                f"{self!r} needs the monitored value: call tx.update(grads, state, params, "
                f"value=loss) (no value= keyword argument was given).")
        value = jnp.asarray(extra["value"])
        if value.size != 1:
            raise ValueError(f"{self!r}: value= must be a scalar (the loss); got shape "
                             f"{value.shape}.")
        value = value.reshape(()).astype(jnp.float32)
        out = _scaled(self.name, updates, state.scale)

        one_i = jnp.ones((), jnp.int32)
        zero_i = jnp.zeros((), jnp.int32)
        total = state.accumulated_value + value
        count = state.accumulation_count + one_i
        evaluate = count >= jnp.asarray(self.accumulation_size, jnp.int32)
        mean = total / count.astype(jnp.float32)

        better = self._improves(mean, state.best_value)
        best = jnp.where(better, mean, state.best_value)
        plateau = jnp.where(better, zero_i, numerics.safe_increment(state.plateau_count))
        in_cooldown = state.cooldown_count > 0
        cooldown = jnp.where(in_cooldown, state.cooldown_count - one_i, state.cooldown_count)
        plateau = jnp.where(in_cooldown, zero_i, plateau)
        reduce = plateau > jnp.asarray(self.patience, jnp.int32)
        candidate = jnp.maximum(state.scale * jnp.asarray(self.factor, jnp.float32),
                                jnp.asarray(self.min_scale, jnp.float32))
        change = reduce & (state.scale - candidate > jnp.asarray(self.eps, jnp.float32))
        scale = jnp.where(change, candidate, state.scale)
        cooldown = jnp.where(reduce, jnp.asarray(self.cooldown, jnp.int32), cooldown)
        plateau = jnp.where(reduce, zero_i, plateau)

        def pick(new, old):
            return jnp.where(evaluate, new, old)

        new_state = ReduceOnPlateauState(
            scale=pick(scale, state.scale), best_value=pick(best, state.best_value),
            plateau_count=pick(plateau, state.plateau_count),
            cooldown_count=pick(cooldown, state.cooldown_count),
            accumulated_value=pick(jnp.zeros((), jnp.float32), total),
            accumulation_count=pick(zero_i, count))
        return out, new_state
