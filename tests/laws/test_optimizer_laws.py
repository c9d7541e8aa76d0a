"""Optimizer laws: every alias is the chain it documents, ``inject_hyperparams`` changes nothing,
gradient accumulation over k equal micro-batches is one large-batch step."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradtx as g
from strategies import (assert_trees_close, assert_trees_equal, dtype_context, eps_of, problems,
                        run)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optimizer_registry import ENTRIES  # noqa: E402

SETTINGS = settings(max_examples=15, deadline=None)

lr = st.floats(0.0, 1.0)
beta = st.floats(0.0, 0.99)
eps = st.floats(1e-8, 1e-3)
wd = st.one_of(st.just(0.0), st.floats(1e-5, 0.1))


def _decay(weight_decay):
    return (g.add_decoupled_weight_decay(weight_decay),) if weight_decay else ()


def _momentum(m, nesterov=False, dampening=0.0):
    return (g.trace(m, nesterov=nesterov, dampening=dampening),) if m else ()


# (alias call, documented chain) pairs drawn with random hyperparameters
ALIASES = {
    "sgd": st.builds(
        lambda lr, m, nest, damp, wd: (
            g.sgd(lr, momentum=m, nesterov=nest and m > 0, dampening=damp, weight_decay=wd),
            g.chain(*_decay(wd), *_momentum(m, nest and m > 0, damp), g.scale_by_learning_rate(lr))),
        lr, st.one_of(st.just(0.0), beta), st.booleans(), st.floats(0.0, 0.5), wd),
    "adam": st.builds(
        lambda lr, b1, b2, e, wd: (
            g.adam(lr, b1, b2, e, weight_decay=wd),
            g.chain(*_decay(wd), g.scale_by_adam(b1, b2, e), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps, wd),
    "adamw": st.builds(
        lambda lr, b1, b2, e, wd: (
            g.adamw(lr, b1, b2, e, weight_decay=wd),
            g.chain(g.scale_by_adam(b1, b2, e), *_decay(wd), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps, wd),
    "nadam": st.builds(
        lambda lr, b1, b2, e: (
            g.nadam(lr, b1, b2, e),
            g.chain(g.scale_by_adam(b1, b2, e, nesterov=True), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps),
    "nadamw": st.builds(
        lambda lr, b1, b2, e, wd: (
            g.nadamw(lr, b1, b2, e, weight_decay=wd),
            g.chain(g.scale_by_adam(b1, b2, e, nesterov=True), *_decay(wd),
                    g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps, wd),
    "amsgrad": st.builds(
        lambda lr, b1, b2, e: (
            g.amsgrad(lr, b1, b2, e),
            g.chain(g.scale_by_adam(b1, b2, e, amsgrad=True), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps),
    "adamax": st.builds(
        lambda lr, b1, b2, e: (
            g.adamax(lr, b1, b2, e),
            g.chain(g.scale_by_adamax(b1, b2, e), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps),
    "radam": st.builds(
        lambda lr, b1, b2, e: (
            g.radam(lr, b1, b2, e),
            g.chain(g.scale_by_radam(b1, b2, e), g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps),
    "adabelief": st.builds(
        lambda lr, b1, b2, wd: (
            g.adabelief(lr, b1, b2, weight_decay=wd),
            g.chain(g.scale_by_belief(b1, b2), *_decay(wd), g.scale_by_learning_rate(lr))),
        lr, beta, beta, wd),
    "adagrad": st.builds(
        lambda lr, init, e: (
            g.adagrad(lr, initial_accumulator_value=init, eps=e),
            g.chain(g.scale_by_rss(initial_accumulator_value=init, eps=e),
                    g.scale_by_learning_rate(lr))),
        lr, st.floats(0.0, 1.0), eps),
    "rmsprop": st.builds(
        lambda lr, d, e, centered, m: (
            g.rmsprop(lr, decay=d, eps=e, centered=centered, momentum=m),
            g.chain((g.scale_by_stddev if centered else g.scale_by_rms)(
                decay=d, eps=e, eps_in_sqrt=True), *_momentum(m), g.scale_by_learning_rate(lr))),
        lr, beta, eps, st.booleans(), st.one_of(st.just(0.0), beta)),
    "adadelta": st.builds(
        lambda lr, rho, e: (
            g.adadelta(lr, rho=rho, eps=e),
            g.chain(g.scale_by_adadelta(rho=rho, eps=e), g.scale_by_learning_rate(lr))),
        lr, beta, eps),
    "lamb": st.builds(
        lambda lr, b1, b2, e, wd: (
            g.lamb(lr, b1, b2, e, weight_decay=wd),
            g.chain(g.scale_by_adam(b1, b2, e), *_decay(wd), g.scale_by_trust_ratio(),
                    g.scale_by_learning_rate(lr))),
        lr, beta, beta, eps, wd),
    "lars": st.builds(
        lambda lr, wd, tc, m: (
            g.lars(lr, weight_decay=wd, trust_coefficient=tc, momentum=m),
            g.chain(*_decay(wd), g.scale_by_trust_ratio(trust_coefficient=tc, form="lars",
                                                        weight_decay=wd),
                    *_momentum(m), g.scale_by_learning_rate(lr))),
        lr, wd, st.floats(1e-3, 1.0), st.one_of(st.just(0.0), beta)),
    "lion": st.builds(
        lambda lr, b1, b2, wd: (
            g.lion(lr, b1, b2, weight_decay=wd),
            g.chain(g.scale_by_lion(b1, b2), *_decay(wd), g.scale_by_learning_rate(lr))),
        lr, beta, beta, wd),
    "sign_sgd": st.builds(
        lambda lr, wd: (
            g.sign_sgd(lr, weight_decay=wd),
            g.chain(g.scale_by_sign(), *_decay(wd), g.scale_by_learning_rate(lr))),
        lr, wd),
    "adafactor": st.builds(
        lambda lr, d, scale, wd: (
            g.adafactor(lr, decay_rate=d, multiply_by_parameter_scale=scale, weight_decay=wd,
                        min_dim_size_to_factor=2),
            g.chain(g.scale_by_factored_rms(decay_rate=d, min_dim_size_to_factor=2),
                    *((g.scale_by_param_block_rms(),) if scale else ()), *_decay(wd),
                    g.scale_by_learning_rate(lr))),
        st.floats(1e-3, 1.0), st.floats(0.1, 1.0), st.booleans(), wd),
}


def test_every_optimizer_has_a_documented_chain_law():
    """The law below covers every alias gradtx exports (a new alias must be added here)."""
    assert set(ALIASES) == set(g.optimizers.__all__)


@settings(max_examples=25, deadline=None)
@given(pair=st.sampled_from(sorted(ALIASES)).flatmap(lambda name: ALIASES[name]),
       problem=problems(steps=(1, 3)))
def test_every_optimizer_equals_its_documented_chain(pair, problem):
    """alias(**hp) == chain(...) by value (==, hash, repr) and by behaviour (every step)."""
    alias, chain = pair
    assert alias == chain and hash(alias) == hash(chain) and repr(alias) == repr(chain)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, got_states = run(alias, params, grads)
        want, want_states = run(chain, params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            assert_trees_equal(got_states[t + 1], want_states[t + 1], what=f"state, step {t}")


entries = st.sampled_from(ENTRIES)


@SETTINGS
@given(entry=entries, problem=problems(steps=(1, 3)))
def test_inject_hyperparams_is_the_transform(entry, problem):
    """inject_hyperparams(tx) ≡ tx: same updates and inner state at every step.

    Injected values are float32 arrays, while the bare transform may do scalar arithmetic on its
    Python-float hyperparameters in float64 (e.g. ``1 - b1``, ``log(b2)`` for bias corrections),
    so the two agree to float32 rounding of the hyperparameters: ~1e-5 relative after a few
    steps, and one ulp of the leaf dtype where that moves a rounding boundary.
    """
    tx = entry.make()
    injected = g.inject_hyperparams(tx)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, got_states = run(injected, params, grads)
        want, want_states = run(tx, params, grads)
        tol = 2 * eps_of(problem.dtype) if problem.dtype in ("bfloat16", "float16") else 1e-4
        for t in range(len(grads)):
            assert_trees_close(got[t], want[t], rtol=tol, atol=tol, what=f"updates, step {t}")
            assert_trees_close(got_states[t + 1].inner_state, want_states[t + 1], rtol=tol,
                               atol=tol, what=f"state, step {t}")


@settings(max_examples=6, deadline=None)
@given(entry=entries, k=st.integers(1, 3), outer=st.integers(1, 2), data=st.data())
def test_accumulation_equals_the_mean_gradient_step(entry, k, outer, data):
    """accumulate_gradients(tx, k): every k-th update is tx's update on the mean of the last k
    gradients (summed in order in float32, divided by k, cast), with tx's state; the other
    updates are zeros and leave the inner state untouched (bit for bit).

    The inner transform runs inside ``lax.cond`` (compiled), the reference eagerly, so the applied
    updates agree to compiled-vs-eager rounding (a few ulps), not bit for bit."""
    problem = data.draw(problems(steps=(k * outer, k * outer)))
    tx = entry.make()
    acc = g.accumulate_gradients(tx, every_k=k)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        state, inner_state = acc.init(params), tx.init(params)
        p_acc = p_ref = params
        for i in range(outer):
            micro = grads[i * k:(i + 1) * k]
            for j, gr in enumerate(micro):
                before = state.inner_state
                u, state = acc.update(gr, state, p_acc)
                if j < k - 1:
                    assert_trees_equal(u, jax.tree.map(jnp.zeros_like, gr))
                    assert_trees_equal(state.inner_state, before)
                p_acc = g.apply_updates(p_acc, u)
            total = jax.tree.map(lambda x: x.astype(jnp.float32), micro[0])
            for gr in micro[1:]:
                total = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), total, gr)
            mean = jax.tree.map(lambda a, x: (a / k).astype(x.dtype), total, micro[0])
            u_ref, inner_state = tx.update(mean, inner_state, p_ref)
            p_ref = g.apply_updates(p_ref, u_ref)
            tol = max(8 * eps_of(problem.dtype), 1e-5)
            assert_trees_close(u, u_ref, rtol=tol, atol=tol, what=f"applying step {i}")
            assert_trees_close(state.inner_state, inner_state, rtol=tol, atol=tol,
                               what=f"inner state {i}")
            assert bool(state.applied)


@settings(max_examples=10, deadline=None)
@given(entry=entries, k=st.sampled_from([2, 4]), seed=st.integers(0, 2 ** 31))
@example(entry=next(e for e in ENTRIES if e.name == "adam"), k=2, seed=31816)  # cancelling w[0]
def test_accumulation_over_equal_micro_batches_is_one_large_batch_step(entry, k, seed):
    """For a mean loss over a batch split into k equal micro-batches, k accumulated micro-steps
    give the update of one step on the whole batch (float32; the batch gradient and the mean of
    micro-batch gradients differ only by summation order)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    tx = entry.make()
    acc = g.accumulate_gradients(tx, every_k=k)
    state = acc.init(params)
    micro = [jax.grad(loss)(params, xb, yb) for xb, yb in zip(jnp.split(x, k), jnp.split(y, k))]
    for grads in micro:
        u, state = acc.update(grads, state, params)
    full = jax.grad(loss)(params, x, y)
    want, _ = tx.update(full, tx.init(params), params)
    # A coordinate whose micro-batch gradients cancel to rounding noise (seed 31816, k=2: ±1.2787
    # summing to -2.9e-7) has no defined direction: Adam's g/(|g|+ε), like a sign, turns that
    # rounding into an O(lr) change. The law is checked on every other coordinate.
    scale = jax.tree.map(lambda *gs: sum(jnp.abs(gr) for gr in gs) / k, *micro)
    defined = jax.tree.map(lambda f, s: jnp.abs(f) > 1e-4 * s, full, scale)
    keep = lambda tree: jax.tree.map(lambda a, d: jnp.where(d, a, 0.0), tree, defined)  # noqa: E731
    assert_trees_close(keep(u), keep(want), rtol=2e-5, atol=2e-6)
