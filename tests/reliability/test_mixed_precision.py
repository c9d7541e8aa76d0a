"""Mixed precision (issue 4 §2): bf16/f16 parameters and gradients.

* Finite updates whose dtype is the gradient's (no silent upcast), params keep their dtype.
* Documented state dtypes: step counters int32; per-parameter moments in the parameter's dtype by
  default (``mu_dtype``/``nu_dtype``/``accumulator_dtype`` override); averages of
  ``ema_params``/``swa`` in float32 for low-precision parameters; accumulated gradient sums in
  float32; injected hyperparameters float32.
* Adam-family denominators cannot divide by zero: zero gradients for many steps give exact zero,
  finite updates.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from reliability_common import OPTIMIZER_NAMES, OPTIMIZERS, loss_fn, make_params  # noqa: E402

g = gradtx
LOW = [jnp.bfloat16, jnp.float16]


def _run(tx, dtype, steps=3):
    params = make_params(dtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return gradtx.apply_updates(params, updates), state, updates, grads

    for _ in range(steps):
        params, state, updates, grads = step(params, state)
    return params, state, updates, grads


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_low_precision_updates_finite_and_not_upcast(name, dtype):
    params, state, updates, grads = _run(OPTIMIZERS[name](), dtype)
    for u, gr, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert u.dtype == gr.dtype == dtype, f"{name}: update {u.dtype} for {gr.dtype} grads"
        assert p.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        dt = jnp.result_type(leaf)
        key = jax.tree_util.keystr(path)
        assert dt in (jnp.int32, jnp.bool_, jnp.float32, dtype), f"{name}: {key} has dtype {dt}"
        if jnp.issubdtype(dt, jnp.integer):
            assert dt == jnp.int32, key
        if jnp.issubdtype(dt, jnp.floating) and "best_value" not in key:
            assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))), f"{name}: {key}"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
def test_documented_state_dtypes(dtype):
    params = make_params(dtype)
    adam = g.scale_by_adam().init(params)
    assert adam.count.dtype == jnp.int32 and adam.mu_product.dtype == jnp.float32
    assert all(x.dtype == dtype for x in jax.tree.leaves((adam.mu, adam.nu)))
    adam32 = g.scale_by_adam(mu_dtype="float32", nu_dtype="float32").init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam32.mu, adam32.nu)))
    assert all(x.dtype == jnp.float32
               for x in jax.tree.leaves(g.trace(accumulator_dtype="float32").init(params).trace))
    assert all(x.dtype == dtype for x in jax.tree.leaves(g.trace().init(params).trace))
    assert all(x.dtype == jnp.float32
               for x in jax.tree.leaves(g.ema_params(0.9).init(params).ema))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g.swa(start_step=1).init(params).mean))
    acc = g.accumulate_gradients(g.sgd(0.1), every_k=2).init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(acc.grad_sum))
    inj = g.inject_hyperparams(g.adam(0.1)).init(params)
    assert all(v.dtype == jnp.float32 for v in inj.hyperparams.values())


@pytest.mark.parametrize("dtype", [jnp.float32] + LOW, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "amsgrad", "radam", "adamax",
                                  "adabelief", "lamb", "rmsprop", "rmsprop_centered", "adagrad",
                                  "adadelta", "adafactor"])
def test_zero_gradients_never_divide_by_zero(name, dtype):
    """Zero gradients for many steps: exact zero (or, with weight decay, finite) updates."""
    tx = OPTIMIZERS[name]()
    params = jax.tree.map(jnp.zeros_like, make_params(dtype))   # zero params: no decay term
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def steps(state):
        def body(state, _):
            updates, state = tx.update(zeros, state, params, value=jnp.float32(0.0))
            return state, updates
        return jax.lax.scan(body, state, None, length=50)

    _, updates = steps(state)
    for u in jax.tree.leaves(updates):
        u32 = u.astype(jnp.float32)
        assert bool(jnp.all(jnp.isfinite(u32))), f"{name}: non-finite update for zero gradients"
        assert bool(jnp.all(u32 == 0.0)), f"{name}: non-zero update for zero gradients"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
def test_tiny_eps_in_low_precision_state_does_not_divide_by_zero(dtype):
    """eps=1e-8 underflows in float16 (and is far below bf16's resolution near 1): the division
    is done in float32, so tiny second moments stored in low precision stay finite."""
    tx = g.adam(0.1)
    params = make_params(dtype)
    state = tx.init(params)
    tiny = jax.tree.map(lambda p: jnp.full(p.shape, 1e-30, jnp.float32).astype(dtype), params)
    updates, _ = tx.update(tiny, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))
