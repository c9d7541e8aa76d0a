"""Non-finite gradients (issue 4 §2).

* Documented behaviour of every optimizer: a NaN/Inf gradient **propagates** (gradtx never masks it
  silently): the update of the bad leaf (or, for a sign-based step, the state) becomes non-finite
  and so do the parameters. Only ``gradtx.skip_nonfinite`` drops bad steps, and it says so in its
  state (``skipped``, ``total_skips``).
* ``skip_nonfinite`` returns zero updates and the inner state bit-identical on a bad step.
* A jitted training loop of a small MLP with NaN/Inf injected at random steps recovers and ends
  bit-identical to the same loop run without the bad steps.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from reliability_common import (OPTIMIZER_NAMES, OPTIMIZERS, loss_fn, make_params,  # noqa: E402
                                tree_bits_equal)

g = gradtx
#: Optimizers starting with gradtx.clip (element-wise): an infinity becomes ±max_delta.
CLIPS_ELEMENTWISE = {"named_masked_momentum"}
BAD_STEP = 3          # an applying step for accumulate_gradients(every_k=2) too


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def _poison(grads, value):
    return dict(grads, w=grads["w"].at[1].set(value))


def _run_until_bad(tx, value):
    params = make_params()
    state = tx.init(params)
    for i in range(BAD_STEP + 1):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        if i == BAD_STEP:
            grads = _poison(grads, value)
        prev_state = state
        updates, state = tx.update(grads, state, params, value=loss)
        params = gradtx.apply_updates(params, updates)
    return updates, state, prev_state, params


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n != "skip_nonfinite_sgdm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradients_propagate(name, value):
    """No optimizer masks a bad gradient: its update or state turns non-finite, then the params."""
    if name in CLIPS_ELEMENTWISE and math.isinf(value):
        pytest.skip("element-wise clip(max_delta) maps ±Inf to ±max_delta by definition; "
                    "NaN still propagates (checked)")
    tx = OPTIMIZERS[name]()
    updates, state, _, params = _run_until_bad(tx, value)
    visible = not _all_finite(updates["w"]) or not _all_finite(state)
    assert visible, f"{name}: a {value} gradient was silently absorbed"
    if math.isnan(value):
        # NaN survives every arithmetic path (sign(nan) is nan): the update itself is NaN.
        assert bool(jnp.any(jnp.isnan(updates["w"]))), f"{name}: NaN gradient, finite update"
        assert bool(jnp.any(jnp.isnan(params["w"])))
    # Propagation is local to what the bad value touches in per-leaf optimizers; but no optimizer
    # turns a bad gradient into a *finite* wrong step on every leaf while reporting nothing.


def test_nonfinite_in_a_sign_based_step_shows_in_the_state():
    """Lion: sign(+inf) = 1 is a finite update, but the momentum holds the infinity."""
    tx = OPTIMIZERS["lion"]()
    updates, state, _, _ = _run_until_bad(tx, math.inf)
    assert not _all_finite(state)


SKIP_INNER = ["adam", "adamw", "sgd_momentum", "lion", "adafactor", "lamb", "rmsprop_centered",
              "lookahead_adam", "accumulate_adam", "switch_adam_sgd", "ema_params_adam",
              "inject_adamw", "partition_lamb_adam", "plateau_adam"]


@pytest.mark.parametrize("name", SKIP_INNER)
def test_skip_nonfinite_keeps_params_and_inner_state_bit_identical(name):
    tx = g.skip_nonfinite(OPTIMIZERS[name](), max_consecutive_skips=None)

    @jax.jit
    def step(params, state, bad):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = jax.tree.map(lambda x: x, grads)
        w = jnp.where(bad == 1, grads["w"].at[0].set(jnp.nan),
                      jnp.where(bad == 2, grads["w"].at[2].set(-jnp.inf), grads["w"]))
        updates, state = tx.update(dict(grads, w=w), state, params, value=loss)
        return gradtx.apply_updates(params, updates), state, updates

    params = make_params()
    state = tx.init(params)
    for i in range(3):
        params, state, _ = step(params, state, jnp.int32(0))
    for bad in (1, 2, 1):
        new_params, new_state, updates = step(params, state, jnp.int32(bad))
        assert bool(new_state.skipped)
        assert tree_bits_equal(new_state.inner_state, state.inner_state)
        assert tree_bits_equal(new_params, params)
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
        params, state = new_params, new_state
    assert int(state.total_skips) == 3
    params, state, _ = step(params, state, jnp.int32(0))
    assert not bool(state.skipped) and int(state.consecutive_nonfinite) == 0
    assert _all_finite(params)
    assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# A real (small, jitted) training loop with faults at random steps


def _mlp_init():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"dense1": {"kernel": 0.5 * jax.random.normal(k1, (4, 8), jnp.float32),
                       "bias": jnp.zeros((8,), jnp.float32)},
            "dense2": {"kernel": 0.5 * jax.random.normal(k2, (8, 1), jnp.float32),
                       "bias": jnp.zeros((1,), jnp.float32)}}


def _data():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 4), jnp.float32)
    y = jnp.sin(jnp.sum(x, axis=-1, keepdims=True))
    return x, y


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None, :])
    out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None, :]
    return jnp.mean((out - y) ** 2)


MLP_TX = g.skip_nonfinite(g.chain(g.clip_by_global_norm(1.0), g.adamw(1e-2, weight_decay=1e-3)))
N_STEPS = 30


@jax.jit
def _mlp_step(params, state, batch, poison):
    """One step on batch ``batch``; ``poison`` (float32) is added to one gradient entry if != 0."""
    xs, ys = _data()
    x, y = xs[batch], ys[batch]
    loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
    k = grads["dense1"]["kernel"]
    bad = jnp.where(poison != 0, poison, jnp.zeros((), jnp.float32))
    grads["dense1"]["kernel"] = k.at[1, 2].add(bad)
    updates, state = MLP_TX.update(grads, state, params)
    return gradtx.apply_updates(params, updates), state, loss


def _train(bad_steps: dict, drop_bad: bool):
    params = _mlp_init()
    state = MLP_TX.init(params)
    losses = []
    for i in range(N_STEPS):
        if i in bad_steps and drop_bad:
            continue
        poison = jnp.float32(bad_steps.get(i, 0.0))
        params, state, loss = _mlp_step(params, state, jnp.int32(i % 4), poison)
        losses.append(float(loss))
    return params, state, losses


@settings(max_examples=10, deadline=None, derandomize=True)
@given(bad=st.dictionaries(st.integers(0, N_STEPS - 1),
                           st.sampled_from([math.nan, math.inf, -math.inf]),
                           min_size=1, max_size=4))
def test_training_with_random_faults_recovers_and_equals_the_clean_run(bad):
    faulty_params, faulty_state, losses = _train(bad, drop_bad=False)
    clean_params, clean_state, clean_losses = _train(bad, drop_bad=True)
    assert tree_bits_equal(faulty_params, clean_params)
    assert tree_bits_equal(faulty_state.inner_state, clean_state.inner_state)
    assert int(faulty_state.total_skips) == len(bad)
    assert _all_finite(faulty_params)
    assert clean_losses[-1] < clean_losses[0]
    assert _mlp_step._cache_size() == 1


def test_without_skip_a_single_fault_ruins_the_run():
    """The control: the same loop without skip_nonfinite ends with NaN parameters."""
    tx = MLP_TX.inner
    params = _mlp_init()
    state = tx.init(params)
    xs, ys = _data()
    for i in range(5):
        grads = jax.grad(_mlp_loss)(params, xs[i % 4], ys[i % 4])
        if i == 2:
            grads["dense2"]["bias"] = grads["dense2"]["bias"].at[0].set(jnp.nan)
        updates, state = tx.update(grads, state, params)
        params = gradtx.apply_updates(params, updates)
    assert np.isnan(np.asarray(params["dense1"]["kernel"])).any()
