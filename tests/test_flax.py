"""Flax integration: gradtx optimizers drive nnx.Optimizer and Linen's TrainState unchanged.

Flax keeps ``tx`` as a static attribute (NNX graph metadata, TrainState's non-pytree field): so a
gradtx optimizer must be hashable with value equality, hold no arrays, and rebuilding an equal one
must hit the existing jit cache instead of retracing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")


_RNG = np.random.default_rng(0)
_X = _RNG.uniform(-1.0, 1.0, (64, 2)).astype(np.float32)
_Y = (np.sin(2.0 * _X[:, :1]) * np.cos(_X[:, 1:])
      + 0.05 * _RNG.standard_normal((64, 1))).astype(np.float32)


def _data():
    return jnp.asarray(_X), jnp.asarray(_Y)


# ---------------------------------------------------------------------------------------------
# NNX


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(2, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _make_train_step(traces):
    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(1)
        loss, grads = nnx.value_and_grad(_mse)(model, x, y)
        optimizer.update(model, grads)
        return loss

    return train_step


def _train_nnx(tx, steps=150, traces=None, train_step=None):
    traces = [] if traces is None else traces
    train_step = train_step or _make_train_step(traces)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = _data()
    first = float(_mse(model, x, y))
    for _ in range(steps):
        train_step(model, optimizer, x, y)
    return model, optimizer, first, float(_mse(model, x, y))


def test_nnx_optimizer_trains_with_adamw():
    traces = []
    model, optimizer, first, last = _train_nnx(gradtx.adamw(1e-2, weight_decay=1e-4),
                                               traces=traces)
    assert last < 0.25 * first, (first, last)
    assert len(traces) == 1                        # one trace for all steps
    assert int(optimizer.step[...]) == 150
    # The optimizer state kept its gradtx structure (count and one moment per parameter).
    leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert len([x for x in leaves if jnp.ndim(x) >= 1]) == 2 * n_params


def test_nnx_rebuilding_an_equal_optimizer_does_not_retrace():
    traces = []
    train_step = _make_train_step(traces)
    _train_nnx(gradtx.adamw(1e-2, weight_decay=1e-4), steps=3, traces=traces,
               train_step=train_step)
    _train_nnx(gradtx.adamw(1e-2, weight_decay=1e-4), steps=3, traces=traces,
               train_step=train_step)
    assert len(traces) == 1
    _train_nnx(gradtx.adamw(2e-2, weight_decay=1e-4), steps=1, traces=traces,
               train_step=train_step)
    assert len(traces) == 2                        # a different optimizer is a different program


def test_nnx_partition_and_masked_decay_on_nnx_state():
    # Masks and labels given as functions are resolved against whatever tree Flax passes:
    # nnx.State of Variables at init, plain arrays at update.
    def label_by_rank(params):
        return jax.tree.map(lambda p: "kernel" if len(jnp.shape(p)) >= 2 else "bias", params)

    def kernels(params):
        return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)

    tx = gradtx.partition(
        {"kernel": gradtx.chain(gradtx.scale_by_adam(),
                                gradtx.add_decoupled_weight_decay(0.5, mask=kernels),
                                gradtx.scale_by_learning_rate(1e-2)),
         "bias": gradtx.set_to_zero()},
        label_by_rank)
    model0 = MLP(nnx.Rngs(0))
    bias0 = np.asarray(model0.hidden.bias[...])
    model, _, first, last = _train_nnx(tx, steps=100)
    assert last < first
    np.testing.assert_array_equal(np.asarray(model.hidden.bias[...]), bias0)   # frozen
    assert not np.allclose(np.asarray(model.hidden.kernel[...]),
                           np.asarray(model0.hidden.kernel[...]))


def test_nnx_masks_module_selectors_on_nnx_state():
    # gradtx.masks selectors resolve paths on nnx.State (Variables at init, arrays at update).
    masks = gradtx.masks
    tx = gradtx.partition(
        {"frozen": gradtx.set_to_zero(),
         "train": gradtx.adamw(1e-2, weight_decay=0.5, mask=masks.decay_default())},
        masks.labels({"frozen": masks.paths("out/*")}, default="train"))
    model0 = MLP(nnx.Rngs(0))
    model, _, first, last = _train_nnx(tx, steps=50)
    assert last < first
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(getattr(model.out, name)[...]),
                                      np.asarray(getattr(model0.out, name)[...]))
        assert not np.allclose(np.asarray(getattr(model.hidden, name)[...]),
                               np.asarray(getattr(model0.hidden, name)[...]))


# ---------------------------------------------------------------------------------------------
# Linen TrainState


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(1)(jnp.tanh(linen.Dense(32)(x)))


LINEN_MODULE = LinenMLP()   # one apply_fn: TrainState keeps it (like tx) as static metadata


def _linen_setup(tx):
    module = LINEN_MODULE
    x, y = _data()
    params = module.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
    return state, x, y


def _linen_loss(params, apply_fn, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


def test_linen_train_state_trains_with_lamb():
    traces = []

    @jax.jit
    def train_step(state, x, y):
        traces.append(1)
        grads = jax.grad(_linen_loss)(state.params, state.apply_fn, x, y)
        return state.apply_gradients(grads=grads)

    state, x, y = _linen_setup(gradtx.lamb(3e-2, weight_decay=1e-4))
    first = float(_linen_loss(state.params, state.apply_fn, x, y))
    for _ in range(150):
        state = train_step(state, x, y)
    last = float(_linen_loss(state.params, state.apply_fn, x, y))
    assert last < 0.25 * first, (first, last)
    assert int(state.step) == 150 and len(traces) == 1

    # An equal, rebuilt optimizer in a fresh TrainState reuses the compiled step.
    state2, _, _ = _linen_setup(gradtx.lamb(3e-2, weight_decay=1e-4))
    assert state2.tx == state.tx and state2.tx is not state.tx
    train_step(state2, x, y)
    assert len(traces) == 1
    state3, _, _ = _linen_setup(gradtx.lamb(1e-2, weight_decay=1e-4))
    train_step(state3, x, y)
    assert len(traces) == 2


def test_linen_tx_as_static_jit_argument():
    traces = []

    def step(tx, params, opt_state, x, y):
        traces.append(1)
        grads = jax.grad(_linen_loss)(params, LINEN_MODULE.apply, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return gradtx.apply_updates(params, updates), opt_state

    step = jax.jit(step, static_argnums=0)
    state, x, y = _linen_setup(gradtx.lion(1e-3))
    params, opt_state = state.params, state.opt_state
    for _ in range(2):
        params, opt_state = step(gradtx.lion(1e-3), params, opt_state, x, y)
    assert len(traces) == 1
