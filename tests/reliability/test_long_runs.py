"""Long runs (issue 4 §2): counters saturate at the int32 maximum; nothing overflows at huge steps.

Every int32 counter in every optimizer's state (``count``, ``micro_step`` excepted: it resets) is
set to ``INT32_MAX - 2`` and the optimizer is run for a few steps: counters reach ``INT32_MAX``
and stay there (never wrap negative), and updates stay finite (bias corrections ``1 - β^t`` at
``t ≈ 2^31`` are 1, schedules are past their end). Schedules are finite at every large step.
"""

from __future__ import annotations

import inspect
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from gradtx import numerics, schedules  # noqa: E402
from reliability_common import OPTIMIZER_NAMES, OPTIMIZERS, make_params, make_step  # noqa: E402

INT32_MAX = numerics.INT32_MAX
NEAR = INT32_MAX - 2
#: Counters that are not step counts: they reset (accumulation) or count events.
NOT_STEP_COUNTERS = ("micro_step",)


def _is_counter(path, leaf) -> bool:
    key = jax.tree_util.keystr(path)
    return (np.asarray(leaf).dtype == np.int32 and np.shape(leaf) == ()
            and not any(k in key for k in NOT_STEP_COUNTERS))


def _set_counters(state, value):
    def set_one(path, leaf):
        return jnp.asarray(value, jnp.int32) if _is_counter(path, leaf) else leaf
    return jax.tree_util.tree_map_with_path(set_one, state)


def _counters(state):
    return {jax.tree_util.keystr(p): int(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if _is_counter(p, x)}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_counters_saturate_and_updates_stay_finite(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    step = jax.jit(make_step(tx))
    params, state, _ = step(params, state)             # one ordinary step first
    state = _set_counters(state, NEAR)
    assert _counters(state), f"{name}: no int32 step counter found in the state"
    history = []
    for _ in range(4):
        new_params, state, loss = step(params, state)
        history.append(_counters(state))
        updates = jax.tree.map(lambda a, b: a - b, new_params, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), (
            f"{name}: non-finite update at step ~2^31")
        params = new_params
    # Every step counter that was advanced reached the maximum and stayed there; none wrapped
    # (a counter of an inactive member, e.g. switch's first optimizer after the switch, or an
    # event counter, only has to stay in range and not decrease).
    assert INT32_MAX in history[-1].values(), f"{name}: no counter reached INT32_MAX: {history}"
    for before, after in zip(history, history[1:]):
        for key, value in after.items():
            assert 0 <= value <= INT32_MAX, (name, key, value)
            if before[key] >= NEAR:
                assert value >= before[key], f"{name}: counter {key} went {before[key]} -> {value}"
    for key, value in history[-1].items():
        if history[0][key] > NEAR:
            assert value == INT32_MAX, f"{name}: counter {key} = {value} after saturating"


def test_safe_increment_saturates():
    c = jnp.asarray(INT32_MAX - 1, jnp.int32)
    c = numerics.safe_increment(c)
    assert int(c) == INT32_MAX
    assert int(numerics.safe_increment(c)) == INT32_MAX
    assert int(jax.jit(numerics.safe_increment)(c)) == INT32_MAX


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.9999999, 1.0 - 2.0**-24])
@pytest.mark.parametrize("t", [1, 2, 1000, 2**24 + 1, INT32_MAX])
def test_bias_correction_finite_and_in_range(beta, t):
    bc = numerics.bias_correction(beta, jnp.asarray(t, jnp.int32))
    assert bool(jnp.isfinite(bc)) and 0.0 < float(bc) <= 1.0
    bc_traced = jax.jit(numerics.bias_correction)(jnp.float32(beta), jnp.asarray(t, jnp.int32))
    assert bool(jnp.isfinite(bc_traced)) and 0.0 < float(bc_traced) <= 1.0


def _schedule_instances():
    s = schedules
    return [
        s.constant(0.1), s.linear(1.0, 0.0, 100), s.polynomial(1.0, 0.0, 2.0, 100),
        s.exponential(1.0, 0.5, 10), s.exponential(1.0, 0.999, 1), s.exponential(1e-3, 2.0, 1, end_value=1.0),
        s.exponential(1.0, 0.5, 10, end_value=1e-3), s.piecewise_constant((1.0, 0.1), (10,)),
        s.step_decay(1.0, 3, 0.5), s.multistep(1.0, (10, 20)),
        s.cosine(1.0, 100), s.cosine(1.0, 100, periodic=True), s.warmup_cosine(1.0, 10, 100),
        s.warmup_linear(1.0, 10, 100), s.inverse_sqrt(1.0, 10), s.inverse_sqrt(1.0, 10, 100.0),
        s.warmup_stable_decay(1.0, 10, 10, 10), s.one_cycle(1.0, 100), s.cyclic(0.1, 1.0, 10),
        s.cyclic(0.1, 1.0, 10, mode="exp_range", gamma=0.99), s.sgdr(1.0, 5, 2), s.sgdr(1.0, 7),
        s.join((s.constant(1.0), s.cosine(1.0, 10)), (5,)),
    ]


def test_every_schedule_class_is_exercised():
    classes = {type(x) for x in _schedule_instances()}
    public = {getattr(schedules, n) for n in schedules.__all__
              if inspect.isclass(getattr(schedules, n))
              and issubclass(getattr(schedules, n), schedules.Schedule)
              and getattr(schedules, n) is not schedules.Schedule}
    assert public <= classes, f"add instances of {public - classes}"


@pytest.mark.parametrize("schedule", _schedule_instances(), ids=repr)
def test_schedules_finite_at_huge_steps(schedule):
    steps = jnp.asarray([0, 1, 2**20, 2**24 + 1, 2**30, 2**31 - 2, 2**31 - 1], jnp.int32)
    values = jax.jit(schedule)(steps)
    assert values.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(values))), dict(zip(steps.tolist(), values.tolist()))
    for t in (2**31 - 1, 2**30):
        assert bool(jnp.isfinite(schedule(t)))


def test_adam_bias_correction_at_saturation_is_plain_ratio():
    """At t = 2^31 - 1 the bias corrections are exactly 1: the update is m / (sqrt(v) + eps)."""
    tx = gradtx.scale_by_adam()
    params = jnp.ones(3, jnp.float32)
    state = tx.init(params)._replace(count=jnp.asarray(INT32_MAX, jnp.int32))
    g = jnp.asarray([1.0, -2.0, 0.5], jnp.float32)
    u, state = tx.update(g, state)
    m = 0.1 * g
    v = 0.001 * g * g
    np.testing.assert_allclose(np.asarray(u), np.asarray(m / (jnp.sqrt(v) + 1e-8)), rtol=1e-5)
    assert int(state.count) == INT32_MAX
