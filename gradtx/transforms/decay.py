"""Weight decay: add ``λ·p`` to the update. Where it stands in a chain decides what it means."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from gradtx import _validate, numerics
from gradtx.base import Transform, hyperparameter, option, transform
from gradtx.combine import _freeze_spec, _is_bool, _merge, _resolve, _select
from gradtx.tree import map_leaves

__all__ = ["add_decoupled_weight_decay", "DecayState"]


class DecayState(NamedTuple):
    """State of :class:`add_decoupled_weight_decay`: the step count (int32), used by schedules."""

    count: jax.Array


@transform
class add_decoupled_weight_decay(Transform):
    """Add weight decay to the updates: ``u ← u + λ_t · p`` on the selected parameters.

    ``rate`` (``λ``, default ``1e-4``, Optax's default) is ``>= 0`` or a schedule evaluated at the
    step count (step 0 is the first update). ``mask`` selects which parameters are decayed
    (unselected updates pass through unchanged): ``None`` (all), a tree of bools with the
    parameters' structure or a prefix of it (a bool at a subtree covers the whole subtree), a
    callable ``params -> such a tree``, or a :mod:`gradtx.masks` selector -- exactly as for
    :class:`gradtx.masked`. Needs ``params``. The state is always ``DecayState(count)``, whether
    ``rate`` is a float or a schedule. The sum is computed in float32 (or wider) and cast to the
    update's dtype.

    Placement is the semantics (see the docs of :func:`gradtx.adamw`):

    * before an adaptive scaling it is L2 regularisation (the decay passes through the moments):
      ``torch.optim.Adam(weight_decay=λ)`` / ``SGD(weight_decay=λ)``;
    * after it and before ``scale_by_learning_rate(γ)`` it is AdamW as torch and Optax implement
      it, ``p ← p - γ(adam + λp)``: ``torch.optim.AdamW(weight_decay=λ)``;
    * after ``scale_by_learning_rate`` (with a negative rate) it would be decay not scaled by the
      learning rate.

    Optax: ``optax.add_decayed_weights(weight_decay, mask)`` (same math; Optax's rate may not be a
    schedule and its state is empty).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.add_decoupled_weight_decay(0.5, mask={"w": True, "b": False})
        >>> params = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
        >>> u, state = tx.update({"w": jnp.zeros(1), "b": jnp.zeros(1)}, tx.init(params), params)
        >>> u["w"].tolist(), u["b"].tolist(), int(state.count)
        ([1.0], [0.0], 1)
    """

    rate: Any = hyperparameter(1e-4, low=0.0, schedule=True)
    mask: Any = option(None)

    def _check(self):
        if self.mask is not None:
            object.__setattr__(self, "mask", _freeze_spec(
                self.name, "mask", self.mask, _is_bool, "True or False"))

    def init(self, params):
        del params
        return DecayState(numerics.init_count())

    def _add(self, updates, params, rate, separate: bool = False):
        def one(u, p):
            if separate:   # see _replay
                u, p, r = numerics.unshared((u, p, rate))
            else:
                r = rate
            ct = numerics.compute_dtype(u.dtype)
            return (numerics.as_compute(u) + r.astype(ct) * p.astype(ct)).astype(u.dtype)

        if self.mask is None:
            return map_leaves(self.name, one, updates, params, names=("params",))
        mask = _resolve(self.name, self.mask, params)
        chosen = map_leaves(self.name, one, _select(self.name, mask, updates),
                            _select(self.name, mask, params), names=("params",))
        return _merge(self.name, mask, chosen, updates)

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        rate = numerics.value_at(self.rate, state.count)
        return self._add(updates, params, rate), DecayState(numerics.safe_increment(state.count))

    def _replayable_update(self, updates, state, params=None, **extra):
        """:meth:`update`, and a function that recomputes its updates, bit for bit, from the
        updates it was given and ``params`` (``None`` for a scheduled rate: the state holds the
        count after the step, and at the saturated int32 maximum the count the schedule was read
        at is ambiguous). See :class:`gradtx.chain`."""
        updates, new_state = self.update(updates, state, params, **extra)
        return updates, new_state, (None if _validate.is_schedule(self.rate) else self._replay)

    def _replay(self, updates, new_state, params):
        del new_state
        # each leaf reads its arrays and the rate through its own barrier: the rate's broadcast
        # shared by the reductions of equal-shaped leaves would be materialised
        return self._add(updates, params, numerics.value_at(self.rate, None), separate=True)
