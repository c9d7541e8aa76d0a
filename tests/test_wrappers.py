"""gradtx.wrappers: each wrapper against its definition (an explicit reference loop)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import masks


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def params0(dtype=jnp.float32):
    return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]], dtype), "b": jnp.array([0.1, -0.3], dtype)}


def grads_at(step, dtype=jnp.float32):
    k = jax.random.key(step)
    kw, kb = jax.random.split(k)
    return {"w": jax.random.normal(kw, (2, 2)).astype(dtype),
            "b": jax.random.normal(kb, (2,)).astype(dtype)}


def run(tx, steps, params=None, grad_fn=grads_at, jit=True, **extra):
    params = params0() if params is None else params
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t in range(steps):
        u, state = step(grad_fn(t), state, params, **extra)
        params = gradtx.apply_updates(params, u)
        outs.append(u)
    return params, state, outs


def halve(count):
    return 0.5 * jnp.exp2(-jnp.asarray(count, jnp.float32))


# A transform that reads an extra keyword argument (checks forwarding through the wrappers).
class ExtraState(NamedTuple):
    count: jax.Array


@gradtx.transform
class scale_by_extra(gradtx.Transform):
    factor: float = gradtx.hyperparameter(1.0)

    def init(self, params):
        return ExtraState(gradtx.numerics.init_count())

    def update(self, updates, state, params=None, **extra):
        k = extra.get("k", jnp.ones((), jnp.float32))
        f = gradtx.numerics.value_at(self.factor, None) * k
        return jax.tree.map(lambda u: u * f.astype(u.dtype), updates), ExtraState(state.count + 1)


# ---------------------------------------------------------------------------------------------
# inject_hyperparams


def adamw_chain():
    return gradtx.chain(gradtx.scale_by_adam(b1=0.8), gradtx.add_decoupled_weight_decay(1e-2),
                        gradtx.scale_by_learning_rate(3e-2))


def test_inject_names_are_readable_paths():
    tx = gradtx.inject_hyperparams(adamw_chain())
    names = tx.names()
    assert "0.scale_by_adam.b1" in names and "0.scale_by_adam.eps_root" in names
    assert "1.add_decoupled_weight_decay.rate" in names
    assert "2.scale_by_learning_rate.learning_rate" in names
    nested = gradtx.inject_hyperparams(gradtx.named_chain(
        ("clip", gradtx.masked(gradtx.scale(2.0), {"w": True, "b": False})),
        ("opt", gradtx.partition({"a": gradtx.scale_by_learning_rate(0.1),
                                  "b": gradtx.switch(gradtx.scale(1.0), gradtx.scale(3.0), 2)},
                                 {"w": "a", "b": "b"}))))
    assert nested.names() == ("clip.scale.factor", "opt.a.scale_by_learning_rate.learning_rate",
                              "opt.b.first.scale.factor", "opt.b.second.scale.factor")
    # a schedule is not injected; integer hyperparameters are not either
    tx = gradtx.inject_hyperparams(gradtx.chain(
        gradtx.lookahead(gradtx.scale_by_learning_rate(halve), sync_period=3)))
    assert tx.names() == ("0.lookahead.slow_step_size",)
    assert gradtx.inject_hyperparams(adamw_chain(), exclude=("eps", "eps_root")).names() == (
        "0.scale_by_adam.b1", "0.scale_by_adam.b2", "1.add_decoupled_weight_decay.rate",
        "2.scale_by_learning_rate.learning_rate")
    with pytest.raises(ValueError, match="no hyperparameter"):
        gradtx.inject_hyperparams(adamw_chain(), exclude=("lr",))


# Transforms that evaluate hyperparameters in float32 (numerics.value_at): exact op by op.
EXACT = {
    "sgd_decay": lambda: gradtx.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "partition": lambda: gradtx.partition(
        {"a": gradtx.sgd(0.3, momentum=0.5), "b": gradtx.sign_sgd(0.5, weight_decay=0.1)},
        masks.labels({"a": "w"}, default="b")),
    "masked_schedule": lambda: gradtx.chain(
        gradtx.masked(gradtx.scale(0.3), {"w": False, "b": True}),
        gradtx.trace(decay=0.7, dampening=0.25), gradtx.scale_by_learning_rate(halve)),
    "lookahead": lambda: gradtx.lookahead(gradtx.sgd(0.1, momentum=0.9), sync_period=2,
                                          slow_step_size=0.3),
}
# Adam-family transforms do part of their scalar arithmetic on Python floats in float64
# (transforms/adaptive.py `_scalar`, adam.py `_pow`), so the injected float32 values can differ
# from it in the last bit; under jit XLA also folds constants of the uninjected program.
CLOSE = {
    "adamw_chain": adamw_chain,
    "adamw_alias": lambda: gradtx.adamw(1e-2, weight_decay=0.1, mask=masks.decay_default()),
    **EXACT,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_injected_is_bit_identical_to_uninjected(name, dtype):
    tx = EXACT[name]()
    p = params0(dtype)

    def g(t):
        return grads_at(t, dtype)

    p_ref, s_ref, u_ref = run(tx, 4, p, g, jit=False)
    injected = gradtx.inject_hyperparams(tx)
    p_inj, s_inj, u_inj = run(injected, 4, p, g, jit=False)
    tree_equal(u_ref, u_inj)
    tree_equal(p_ref, p_inj)
    tree_equal(s_ref, s_inj.inner_state)
    # hyperparameters are float32 whatever the parameters' dtype
    assert s_inj.hyperparams and all(v.dtype == jnp.float32 for v in s_inj.hyperparams.values())


@pytest.mark.parametrize("name", sorted(CLOSE))
def test_injected_matches_uninjected_under_jit(name):
    tx = CLOSE[name]()
    p_ref, s_ref, u_ref = run(tx, 4)
    p_inj, s_inj, u_inj = run(gradtx.inject_hyperparams(tx), 4)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_inj.inner_state)
    # a last-bit difference in (1 - b1) grows where the first moment nearly cancels
    rtol = 1e-4 if name.startswith("adam") else 2e-6
    for a, b in zip(jax.tree.leaves((u_ref, p_ref, s_ref)),
                    jax.tree.leaves((u_inj, p_inj, s_inj.inner_state))):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9)


def test_changing_an_injected_value_does_not_recompile():
    tx = gradtx.inject_hyperparams(adamw_chain())
    traces = []

    def step(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    step = jax.jit(step)
    p = params0()
    state = tx.init(p)
    u1, _ = step(grads_at(0), state, p)
    state2 = gradtx.set_hyperparam(state, "learning_rate", 6e-2)
    u2, _ = step(grads_at(0), state2, p)
    assert len(traces) == 1 and step._cache_size() == 1
    np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-6)
    # and the new value equals an uninjected transform built with it
    ref = gradtx.chain(gradtx.scale_by_adam(b1=0.8), gradtx.add_decoupled_weight_decay(1e-2),
                       gradtx.scale_by_learning_rate(float(jnp.float32(6e-2))))
    u_ref, _ = ref.update(grads_at(0), ref.init(p), p)
    for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_vmap_over_injected_learning_rate_sweep():
    tx = gradtx.inject_hyperparams(gradtx.adam(1e-3))
    lrs = jnp.array([0.5, 0.125, 0.25], jnp.float32)
    p = params0()
    states = jax.vmap(lambda lr: gradtx.set_hyperparam(tx.init(p), "learning_rate", lr))(lrs)
    assert states.hyperparams["1.scale_by_learning_rate.learning_rate"].shape == (3,)
    batched = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
    us = []
    for t in range(2):
        u, states = batched(grads_at(t), states, p)
        us.append(u)
    for i, lr in enumerate(lrs.tolist()):
        ref = gradtx.adam(lr)
        s = ref.init(p)
        for t in range(2):
            u_r, s = jax.jit(ref.update)(grads_at(t), s, p)
            np.testing.assert_allclose(us[t]["w"][i], u_r["w"], rtol=1e-6, atol=0)


def test_set_hyperparam_errors_and_nested_injection():
    tx = gradtx.inject_hyperparams(gradtx.chain(gradtx.scale(2.0), gradtx.scale(3.0)))
    state = tx.init(jnp.zeros(1))
    with pytest.raises(ValueError, match="several"):
        gradtx.set_hyperparam(state, "factor", 1.0)
    with pytest.raises(ValueError, match="no injected hyperparameter is named 'lr'"):
        gradtx.set_hyperparam(state, "lr", 1.0)
    with pytest.raises(ValueError, match="no gradtx.inject_hyperparams"):
        gradtx.set_hyperparam(gradtx.scale(1.0).init(None), "factor", 1.0)
    state = gradtx.set_hyperparam(state, "1.scale.factor", 0.5)
    assert tx.update(jnp.ones(1), state)[0].tolist() == [1.0]
    # an injection state inside a chain
    outer = gradtx.chain(gradtx.scale(1.0), gradtx.inject_hyperparams(gradtx.scale(2.0)))
    s = gradtx.set_hyperparam(outer.init(jnp.zeros(1)), "scale.factor", 4.0)
    assert outer.update(jnp.ones(1), s)[0].tolist() == [4.0]
    with pytest.raises(gradtx.TreeMismatchError, match="hyperparams"):
        tx.update(jnp.ones(1), state._replace(hyperparams={}))


def test_inject_with_optax_member_and_extra_arguments():
    optax = pytest.importorskip("optax")
    tx = gradtx.inject_hyperparams(gradtx.chain(optax.sgd(0.5), scale_by_extra(2.0)))
    assert tx.names() == ("1.scale_by_extra.factor",)
    state = tx.init(jnp.zeros(2))
    u, _ = tx.update(jnp.ones(2), state, k=jnp.float32(3.0))
    assert u.tolist() == [-3.0, -3.0]


def test_inject_under_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.inject_hyperparams(gradtx.adamw(1e-2)), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    lr = optimizer.opt_state.hyperparams["2.scale_by_learning_rate.learning_rate"]
    assert float(lr[...]) == pytest.approx(1e-2)


# ---------------------------------------------------------------------------------------------
# current_hyperparams


def test_current_hyperparams_last_and_next_with_schedules():
    tx = gradtx.adamw(halve, weight_decay=0.25)
    p = params0()
    state = tx.init(p)
    lr_name = "2.scale_by_learning_rate.learning_rate"
    h = gradtx.current_hyperparams(tx, state)
    assert h[lr_name].tolist() == 0.5 and h["1.add_decoupled_weight_decay.rate"].tolist() == 0.25
    assert h["0.scale_by_adam.b1"].dtype == jnp.float32
    step = jax.jit(tx.update)
    for t in range(3):
        _, state = step(grads_at(t), state, p)
    assert gradtx.current_hyperparams(tx, state)[lr_name].tolist() == 0.5 * 0.5 ** 2
    assert gradtx.current_hyperparams(tx, state, which="next")[lr_name].tolist() == 0.5 * 0.5 ** 3
    # the "last" value is the one the latest update used: its update equals lr * adam direction
    # works under jit too
    jitted = jax.jit(lambda s: gradtx.current_hyperparams(tx, s))(state)
    assert jitted[lr_name].tolist() == 0.5 * 0.5 ** 2
    with pytest.raises(ValueError, match="which"):
        gradtx.current_hyperparams(tx, state, which="now")


def test_current_hyperparams_reads_injected_and_wrapped_states():
    inner = gradtx.chain(gradtx.scale(2.0), gradtx.scale_by_learning_rate(halve))
    tx = gradtx.inject_hyperparams(gradtx.switch(gradtx.sgd(0.1), inner, switch_step=1))
    state = tx.init(jnp.zeros(1))
    state = gradtx.set_hyperparam(state, "first.0.scale_by_learning_rate.learning_rate", 0.25)
    for _ in range(3):
        _, state = tx.update(jnp.ones(1), state)
    h = gradtx.current_hyperparams(tx, state)
    assert h["first.0.scale_by_learning_rate.learning_rate"].tolist() == 0.25   # injected value
    assert h["second.0.scale.factor"].tolist() == 2.0
    # second ran twice (its own count starts at the switch): the last update used halve(1)
    assert h["second.1.scale_by_learning_rate.learning_rate"].tolist() == 0.25


# ---------------------------------------------------------------------------------------------
# accumulate_gradients


@pytest.mark.parametrize("exact", [True, False])
def test_accumulation_equals_inner_on_the_mean_gradient(exact):
    # powers of two make every rounding independent of how XLA fuses the program: bit-exact
    inner = (gradtx.chain(gradtx.trace(decay=0.5), gradtx.scale_by_learning_rate(0.25))
             if exact else gradtx.adamw(1e-2, weight_decay=0.1))
    k = 4 if exact else 3
    tx = gradtx.accumulate_gradients(inner, every_k=k)
    p = params0()
    state = tx.init(p)
    s_ref = inner.init(p)
    step = jax.jit(tx.update)
    for big_step in range(3):
        micro = [grads_at(10 * big_step + i) for i in range(k)]
        for i, g in enumerate(micro):
            inner_before = state.inner_state
            u, state = step(g, state, p)
            if i < k - 1:
                assert not bool(state.applied)
                tree_equal(u, jax.tree.map(jnp.zeros_like, g))
                tree_equal(state.inner_state, inner_before)
        assert bool(state.applied) and int(state.micro_step) == 0
        total = jax.tree.map(lambda *gs: sum(gs[1:], gs[0]), *micro)
        mean = jax.tree.map(lambda s: s / k, total)
        u_ref, s_ref = jax.jit(inner.update)(mean, s_ref, p)
        if exact:
            tree_equal(u, u_ref)
            tree_equal(state.inner_state, s_ref)
        for a, b in zip(jax.tree.leaves((u, state.inner_state)), jax.tree.leaves((u_ref, s_ref))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        p = gradtx.apply_updates(p, u)


def test_accumulation_matches_large_batch_gradient():
    x = jax.random.normal(jax.random.key(1), (12, 3))
    y = jax.random.normal(jax.random.key(2), (12,))

    def loss(w, xb, yb):
        return jnp.mean((xb @ w - yb) ** 2)

    w0 = jnp.zeros(3)
    inner = gradtx.sgd(0.1, momentum=0.9)
    tx = gradtx.accumulate_gradients(inner, every_k=4)
    state, w = tx.init(w0), w0
    s_big, w_big = inner.init(w0), w0

    @jax.jit
    def micro(w, state, xb, yb):
        u, state = tx.update(jax.grad(loss)(w, xb, yb), state, w)
        return gradtx.apply_updates(w, u), state

    @jax.jit
    def big(w, s):
        u, s = inner.update(jax.grad(loss)(w, x, y), s, w)
        return gradtx.apply_updates(w, u), s

    for _ in range(3):
        for i in range(4):
            w, state = micro(w, state, x[3 * i:3 * i + 3], y[3 * i:3 * i + 3])
        w_big, s_big = big(w_big, s_big)
    np.testing.assert_allclose(w, w_big, rtol=1e-5, atol=1e-6)


def test_accumulation_runs_inner_only_on_applying_steps():
    calls = []

    def record(x):
        calls.append(1)

    def noisy(updates, params):
        jax.debug.callback(record, updates)
        return updates

    tx = gradtx.accumulate_gradients(gradtx.stateless(noisy), every_k=3)
    step = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for _ in range(6):
        _, state = step(jnp.ones(2), state)
    jax.effects_barrier()
    assert len(calls) == 2


def test_accumulation_dtypes_k1_and_extra():
    p = params0(jnp.bfloat16)
    tx = gradtx.accumulate_gradients(gradtx.adam(1e-2), every_k=2)
    state = tx.init(p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.grad_sum))
    u, state = tx.update(grads_at(0, jnp.bfloat16), state, p)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    keep = gradtx.accumulate_gradients(gradtx.adam(1e-2), every_k=2, accumulator_dtype=None)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(keep.init(p).grad_sum))
    # every_k=1 is the inner transform exactly
    _, _, u1 = run(gradtx.accumulate_gradients(adamw_chain(), every_k=1), 3)
    _, _, u_ref = run(adamw_chain(), 3)
    tree_equal(u1, u_ref)
    # extra arguments reach the inner transform
    tx = gradtx.accumulate_gradients(scale_by_extra(), every_k=1)
    assert tx.update(jnp.ones(1), tx.init(jnp.ones(1)), k=jnp.float32(5.0))[0].tolist() == [5.0]
    with pytest.raises(ValueError, match="every_k"):
        gradtx.accumulate_gradients(gradtx.adam(1e-2), every_k=0)
    assert repr(gradtx.accumulate_gradients(gradtx.scale(2.0), every_k=4)) == \
        "accumulate_gradients(inner=scale(factor=2.0), every_k=4)"


# ---------------------------------------------------------------------------------------------
# skip_nonfinite


def with_nan(t):
    g = grads_at(t)
    if t in (2, 3):
        g["w"] = g["w"].at[0, 0].set(jnp.nan if t == 2 else jnp.inf)
    return g


def test_skip_leaves_state_bit_identical_and_equals_dropping_the_steps():
    inner = gradtx.adamw(1e-2, weight_decay=0.1)
    tx = gradtx.skip_nonfinite(inner, max_consecutive_skips=3)
    p = params0()
    state = tx.init(p)
    step = jax.jit(tx.update)
    s_ref, p_ref = inner.init(p), p
    for t in range(6):
        before = state.inner_state
        u, state = step(with_nan(t), state, p)
        p = gradtx.apply_updates(p, u)
        if t in (2, 3):
            assert bool(state.skipped)
            tree_equal(state.inner_state, before)
            tree_equal(u, jax.tree.map(jnp.zeros_like, u))
        else:
            assert not bool(state.skipped)
            u_ref, s_ref = inner.update(grads_at(t), s_ref, p_ref)
            p_ref = gradtx.apply_updates(p_ref, u_ref)
        tree_equal(p, p_ref)
    assert int(state.total_skips) == 2 and int(state.consecutive_nonfinite) == 0


def test_skip_gives_up_after_max_consecutive_and_none_never_does():
    bad = jnp.array([jnp.nan, 1.0])
    tx = gradtx.skip_nonfinite(gradtx.scale_by_learning_rate(1.0), max_consecutive_skips=2)
    state = tx.init(jnp.zeros(2))
    skipped = []
    step = jax.jit(tx.update)
    for _ in range(4):
        u, state = step(bad, state)
        skipped.append(bool(state.skipped))
    assert skipped == [True, True, False, False]
    assert np.isnan(np.asarray(u)[0]) and int(state.total_skips) == 2
    assert int(state.consecutive_nonfinite) == 4
    _, state = step(jnp.ones(2), state)
    assert int(state.consecutive_nonfinite) == 0
    _, state = step(bad, state)
    assert bool(state.skipped)
    never = gradtx.skip_nonfinite(gradtx.scale_by_learning_rate(1.0), max_consecutive_skips=None)
    state = never.init(jnp.zeros(2))
    step = jax.jit(never.update)
    for _ in range(8):
        u, state = step(bad, state)
    assert bool(state.skipped) and u.tolist() == [0.0, 0.0]
    zero = gradtx.skip_nonfinite(gradtx.scale_by_learning_rate(1.0), max_consecutive_skips=0)
    u, state = zero.update(bad, zero.init(jnp.zeros(2)))
    assert not bool(state.skipped)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gradtx.skip_nonfinite(gradtx.scale(1.0), max_consecutive_skips=-1)


def test_skip_under_vmap():
    tx = gradtx.skip_nonfinite(gradtx.adam(1e-2))
    g = jnp.array([[1.0, 2.0], [jnp.nan, 1.0]])
    states = jax.vmap(tx.init)(jnp.zeros((2, 2)))
    u, states = jax.jit(jax.vmap(tx.update))(g, states)
    assert states.skipped.tolist() == [False, True]
    assert u[1].tolist() == [0.0, 0.0] and int(states.inner_state[0].count[1]) == 0


# ---------------------------------------------------------------------------------------------
# lookahead


def quad_grad(p):
    target = {"w": jnp.array([[1.0, 2.0], [-1.0, 0.5]]), "b": jnp.array([0.3, -0.7])}
    return jax.tree.map(lambda x, c: 2.0 * (x - c) * jnp.arange(1, x.size + 1, dtype=x.dtype)
                        .reshape(x.shape), p, target)


def test_lookahead_matches_reference_loop():
    inner = gradtx.sgd(0.05, momentum=0.9)
    k, alpha = 3, 0.5
    tx = gradtx.lookahead(inner, sync_period=k, slow_step_size=alpha)
    p = params0()
    state = tx.init(p)
    step = jax.jit(tx.update)
    # reference: fast weights + slow weights by hand (Zhang et al. 2019, Algorithm 1)
    fast, slow, s_in = params0(), params0(), inner.init(params0())
    for t in range(1, 11):
        u, state = step(quad_grad(p), state, p)
        p = gradtx.apply_updates(p, u)
        u_in, s_in = inner.update(quad_grad(fast), s_in, fast)
        fast = gradtx.apply_updates(fast, u_in)
        if t % k == 0:
            slow = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
            fast = slow
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(fast)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state.slow), jax.tree.leaves(slow)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(quad_grad(p), state)
    with pytest.raises(ValueError, match="slow_step_size"):
        gradtx.lookahead(inner, slow_step_size=1.5)


def test_lookahead_alpha_one_and_injected_alpha():
    # alpha = 1 with sync_period 1 is the inner optimizer itself
    _, _, u_la = run(gradtx.lookahead(gradtx.adam(1e-2), sync_period=1, slow_step_size=1.0), 3,
                     grad_fn=grads_at)
    _, _, u_ref = run(gradtx.adam(1e-2), 3)
    for a, b in zip(jax.tree.leaves(u_la), jax.tree.leaves(u_ref)):
        # (p + u) - p: one rounding at the scale of p
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    tx = gradtx.lookahead(gradtx.sgd(0.1), sync_period=2, slow_step_size=0.5)
    _, _, u_ref = run(tx, 4, jit=False)
    _, _, u_inj = run(gradtx.inject_hyperparams(tx), 4, jit=False)
    tree_equal(u_ref, u_inj)


# ---------------------------------------------------------------------------------------------
# ema_params / swa / averaged_params


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_params_matches_reference(warmup):
    decay = 0.75
    tx = gradtx.chain(gradtx.sgd(0.1, momentum=0.5), gradtx.ema_params(decay, warmup=warmup))
    plain = gradtx.sgd(0.1, momentum=0.5)
    p, p_ref = params0(), params0()
    state, s_ref = tx.init(p), plain.init(p)
    ema = params0()
    step = jax.jit(tx.update)
    for t in range(1, 6):
        u, state = step(quad_grad(p), state, p)
        u_ref, s_ref = plain.update(quad_grad(p_ref), s_ref, p_ref)
        tree_equal(u, u_ref)                               # updates pass unchanged
        p, p_ref = gradtx.apply_updates(p, u), gradtx.apply_updates(p_ref, u_ref)
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        ema = jax.tree.map(lambda e, x: d * e + (1 - d) * x, ema, p)
        for a, b in zip(jax.tree.leaves(gradtx.averaged_params(state)), jax.tree.leaves(ema)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_ema_dtype_and_errors():
    p = params0(jnp.bfloat16)
    tx = gradtx.ema_params(0.999)
    state = tx.init(p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
    _, state = tx.update(grads_at(0, jnp.bfloat16), state, p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads_at(0, jnp.bfloat16), state)
    with pytest.raises(ValueError, match="holds no"):
        gradtx.averaged_params(gradtx.adam(1e-3).init(p))
    both = gradtx.chain(gradtx.ema_params(0.5), gradtx.swa(start_step=1))
    s = both.init(p)
    with pytest.raises(ValueError, match="kind="):
        gradtx.averaged_params(s)
    assert jax.tree.structure(gradtx.averaged_params(s, kind="swa")) == jax.tree.structure(p)


@pytest.mark.parametrize("start,freq", [(1, 1), (3, 2)])
def test_swa_is_the_mean_of_the_snapshots(start, freq):
    tx = gradtx.chain(gradtx.sgd(0.05), gradtx.swa(start_step=start, frequency=freq))
    p = params0()
    state = tx.init(p)
    snaps = []
    step = jax.jit(tx.update)
    for t in range(1, 9):
        u, state = step(quad_grad(p), state, p)
        p = gradtx.apply_updates(p, u)
        if t >= start and (t - start) % freq == 0:
            snaps.append(p)
    assert int(state[1].n_averaged) == len(snaps)
    mean = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / len(xs), *snaps)
    for a, b in zip(jax.tree.leaves(gradtx.averaged_params(state)), jax.tree.leaves(mean)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# freeze


def test_freeze_zero_updates_and_no_state():
    inner = gradtx.adam(1e-2)
    tx = gradtx.freeze(inner, masks.paths("b"))
    p = params0()
    state = tx.init(p)
    assert isinstance(state.inner_state[0].mu["b"], gradtx.MaskedNode)
    assert state.inner_state[0].mu["w"].shape == (2, 2)
    step = tx.update
    s_ref = inner.init({"w": p["w"]})
    for t in range(3):
        u, state = step(grads_at(t), state, p)
        tree_equal(u["b"], jnp.zeros(2))
        u_ref, s_ref = inner.update({"w": grads_at(t)["w"]}, s_ref, {"w": p["w"]})
        tree_equal(u["w"], u_ref["w"])
        p = gradtx.apply_updates(p, u)
    tree_equal(p["b"], params0()["b"])
    # a bool tree mask, a prefix mask (a whole subtree frozen), and NNX Variables at init
    prefix = gradtx.freeze(inner, {"enc": True, "dec": False})
    tree = {"enc": {"w": jnp.ones(2), "b": jnp.ones(2)}, "dec": {"w": jnp.ones(2)}}
    u, _ = prefix.update(tree, prefix.init(tree), tree)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u["enc"]))
    assert bool(jnp.all(u["dec"]["w"] != 0))
    assert hash(gradtx.freeze(inner, {"a": True})) == hash(gradtx.freeze(inner, {"a": True}))


def test_freeze_on_nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, gradtx.freeze(gradtx.sgd(0.5), masks.paths("kernel")),
                              wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    tree_equal(after["kernel"], before["kernel"])
    np.testing.assert_allclose(after["bias"], before["bias"] - 0.5)


# ---------------------------------------------------------------------------------------------
# switch


def test_switch_equals_running_the_two_back_to_back():
    first, second = gradtx.adam(1e-2), gradtx.sgd(halve, momentum=0.9)
    n = 3
    tx = gradtx.switch(first, second, switch_step=n)
    p = params0()
    state = tx.init(p)
    step = jax.jit(tx.update)
    ref_p, s1 = p, first.init(p)
    for t in range(n):
        u_ref, s1 = first.update(quad_grad(ref_p), s1, ref_p)
        ref_p = gradtx.apply_updates(ref_p, u_ref)
    s2 = second.init(ref_p)
    for t in range(4):
        u_ref, s2 = second.update(quad_grad(ref_p), s2, ref_p)
        ref_p = gradtx.apply_updates(ref_p, u_ref)
    for _ in range(n + 4):
        u, state = step(quad_grad(p), state, p)
        p = gradtx.apply_updates(p, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state.first_state), jax.tree.leaves(s1)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # switch_step=0 is the second optimizer from the start
    _, _, u0 = run(gradtx.switch(first, second, switch_step=0), 2)
    _, _, u_ref = run(second, 2)
    tree_equal(u0, u_ref)


def test_switch_carry_over_first_moment():
    first = gradtx.adam(1e-2, b1=0.5)
    second = gradtx.sgd(0.1, momentum=0.9)
    tx = gradtx.switch(first, second, switch_step=2, carry_over=(("mu", "trace"),))
    p = params0()
    state = tx.init(p)
    for t in range(2):
        _, state = tx.update(grads_at(t), state, p)
    mu = state.first_state[0].mu
    u, state = tx.update(grads_at(2), state, p)
    # sgd step with the momentum buffer starting from adam's first moment
    momentum = gradtx.trace(decay=0.9)
    s = momentum.init(p)._replace(trace=mu, count=state.first_state[0].count)
    expected, _ = momentum.update(grads_at(2), s)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, -0.1 * b, rtol=1e-6)
    # without carry-over the buffer starts fresh: differs
    plain = gradtx.switch(first, second, switch_step=2)
    s = plain.init(p)
    for t in range(3):
        u_plain, s = plain.update(grads_at(t), s, p)
    assert not np.allclose(u_plain["w"], u["w"])
    with pytest.raises(ValueError, match="exactly one state field named 'nu'"):
        bad = gradtx.switch(first, second, switch_step=0, carry_over=("nu",))
        bad.update(grads_at(0), bad.init(p), p)
    with pytest.raises(TypeError, match="carry_over"):
        gradtx.switch(first, second, switch_step=1, carry_over=(3,))


# ---------------------------------------------------------------------------------------------
# Every wrapper: a value, jit/vmap/eval_shape, extra arguments


def all_wrappers():
    inner = scale_by_extra(2.0)
    return [
        gradtx.inject_hyperparams(inner),
        gradtx.accumulate_gradients(inner, every_k=1),
        gradtx.skip_nonfinite(inner),
        gradtx.lookahead(inner, sync_period=2),
        gradtx.chain(inner, gradtx.ema_params(0.5)),
        gradtx.chain(inner, gradtx.swa(start_step=1)),
        gradtx.freeze(inner, {"w": False, "b": True}),
        gradtx.switch(inner, inner, switch_step=1),
    ]


@pytest.mark.parametrize("i", range(8))
def test_wrapper_contract(i):
    tx, again = all_wrappers()[i], all_wrappers()[i]
    assert tx == again and hash(tx) == hash(again)
    assert repr(tx).startswith(("inject", "accumulate", "skip", "lookahead", "chain", "freeze",
                                "switch"))
    p = params0()
    abstract = jax.eval_shape(tx.init, p)
    state = tx.init(p)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    g = jax.tree.map(jnp.ones_like, p)
    u, new_state = jax.jit(tx.update)(g, state, p, k=jnp.float32(3.0))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # extra reaches the inner transform: 2 * 3 on every non-frozen leaf
    assert float(u["w"][0, 0]) == 6.0
    # vmap over a batch of parameters/gradients
    pb = jax.tree.map(lambda x: jnp.stack([x, x]), p)
    gb = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), g)
    sb = jax.vmap(tx.init)(pb)
    ub, _ = jax.vmap(tx.update)(gb, sb, pb)
    assert ub["w"].shape == (2, 2, 2)


@pytest.mark.parametrize("i", range(8))
def test_wrappers_drive_nnx_optimizer(i):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    inner = gradtx.sgd(0.5)
    tx = [
        gradtx.inject_hyperparams(inner),
        gradtx.accumulate_gradients(inner, every_k=2),
        gradtx.skip_nonfinite(inner),
        gradtx.lookahead(inner, sync_period=2),
        gradtx.chain(inner, gradtx.ema_params(0.5)),
        gradtx.chain(inner, gradtx.swa(start_step=1)),
        gradtx.freeze(inner, masks.paths("bias")),
        gradtx.switch(inner, gradtx.sgd(0.25), switch_step=1),
    ][i]
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
        optimizer.update(model, grads)

    before = nnx.as_pure(nnx.state(model, nnx.Param))
    for _ in range(2):
        step(model, optimizer)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert not np.allclose(after["kernel"], before["kernel"])


def test_averagers_and_lookahead_with_float32_updates_on_bfloat16_params():
    p = params0(jnp.bfloat16)
    g = jax.tree.map(lambda x: x.astype(jnp.float32), grads_at(0))
    for tx in (gradtx.ema_params(0.5), gradtx.swa(start_step=1),
               gradtx.lookahead(gradtx.scale(-0.25), sync_period=1)):
        u, state = tx.update(g, tx.init(p), p)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
        if isinstance(tx, gradtx.lookahead):
            # lookahead with alpha=.5, sync every step: slow = p + 0.5 * ((p + u) rounded - p)
            fast = jax.tree.map(lambda a, b: (a.astype(jnp.float32) + b).astype(jnp.bfloat16), p,
                                jax.tree.map(lambda x: -0.25 * x, g))
            expect = jax.tree.map(lambda a, f: a.astype(jnp.float32)
                                  + 0.5 * (f.astype(jnp.float32) - a.astype(jnp.float32)), p, fast)
            for a, b in zip(jax.tree.leaves(state.slow), jax.tree.leaves(expect)):
                np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))
