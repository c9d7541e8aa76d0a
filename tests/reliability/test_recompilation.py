"""No recompilation (issue 4 §2), counted two ways.

* ``jax.jit(...)._cache_size()`` of the jitted training step (one entry per compiled signature);
* the number of XLA compilations reported by ``jax.monitoring`` (the backend-compile duration
  event, recorded once per compiled program), which also catches compilations that happen inside
  a step (e.g. a schedule evaluated eagerly).

Cases: across steps, across schedule phases (warm-up → cosine → end), when an injected
hyperparameter changes, and when an equal optimizer is rebuilt (a jitted function taking the
optimizer as a static argument hits the same cache entry).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from reliability_common import OPTIMIZERS, loss_fn, make_params  # noqa: E402
from compilations import count_compilations  # noqa: E402  (tests/ is on the path)

g = gradtx


@functools.partial(jax.jit, static_argnums=0)
def train_step(tx, params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return gradtx.apply_updates(params, updates), state


def _schedule():
    return g.schedules.warmup_cosine(peak_value=0.1, warmup_steps=3, decay_steps_after_warmup=5)


def test_monitoring_counts_compilations():
    """The counter works: a new jitted function compiles once, a second call does not."""
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    with count_compilations() as first:
        f(jnp.ones(7, jnp.float32))
    with count_compilations() as second:
        f(jnp.ones(7, jnp.float32))
    assert first[0] >= 1 and second[0] == 0


@pytest.mark.parametrize("name", ["adamw", "warmup_cosine_adamw", "inject_adamw", "adafactor",
                                  "accumulate_adam", "skip_nonfinite_sgdm", "switch_adam_sgd",
                                  "lookahead_adam", "plateau_adam", "partition_lamb_adam"])
def test_no_recompilation_across_steps_and_schedule_phases(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    params, state = train_step(tx, params, state)       # compile
    size = train_step._cache_size()
    with count_compilations() as n:
        for _ in range(12):     # crosses warm-up -> cosine -> end, switch_step, sync periods
            params, state = train_step(tx, params, state)
    assert n[0] == 0, f"{name}: {n[0]} compilations across steps"
    assert train_step._cache_size() == size


def test_no_recompilation_when_an_equal_optimizer_is_rebuilt():
    params = make_params()
    tx = g.chain(g.clip_by_global_norm(1.0), g.adamw(_schedule(), weight_decay=1e-2))
    state = tx.init(params)
    params, state = train_step(tx, params, state)
    size = train_step._cache_size()
    with count_compilations() as n:
        for _ in range(3):
            rebuilt = g.chain(g.clip_by_global_norm(1.0), g.adamw(_schedule(), weight_decay=1e-2))
            assert rebuilt == tx and hash(rebuilt) == hash(tx) and rebuilt is not tx
            params, state = train_step(rebuilt, params, state)
    assert n[0] == 0 and train_step._cache_size() == size


@pytest.mark.parametrize("name", ["inject_adamw", "switch_adam_sgd", "ema_params_adam",
                                  "freeze_matrices_adam", "lion", "lars"])
def test_equal_rebuilt_registry_optimizers_hit_the_cache(name):
    params = make_params()
    tx = OPTIMIZERS[name]()
    state = tx.init(params)
    params, state = train_step(tx, params, state)
    with count_compilations() as n:
        params, state = train_step(OPTIMIZERS[name](), params, state)
    assert n[0] == 0


def test_changing_an_injected_hyperparameter_does_not_recompile():
    tx = g.inject_hyperparams(g.adamw(0.1, weight_decay=1e-3))
    params = make_params()
    state = tx.init(params)
    params, state = train_step(tx, params, state)
    size = train_step._cache_size()
    history = [params]
    with count_compilations() as n:
        for lr, wd in ((0.05, 1e-3), (0.01, 0.0), (0.2, 0.5)):
            state = g.set_hyperparam(state, "learning_rate", lr)
            state = g.set_hyperparam(state, "add_decoupled_weight_decay.rate", wd)
            params, state = train_step(tx, params, state)
            history.append(params)
    assert n[0] == 0 and train_step._cache_size() == size
    assert float(state.hyperparams["2.scale_by_learning_rate.learning_rate"]) == pytest.approx(0.2)
    for before, after in zip(history, history[1:]):     # the new values were used
        assert not all(bool(jnp.all(a == b)) for a, b in
                       zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_schedule_values_do_not_recompile_when_called_eagerly():
    """A schedule evaluated eagerly at many steps (e.g. for logging) compiles once."""
    s = _schedule()
    s(0)
    with count_compilations() as n:
        values = [float(s(t)) for t in range(12)]
    assert n[0] == 0
    assert values[3] == pytest.approx(0.1) and values[-1] == pytest.approx(0.0, abs=1e-7)
