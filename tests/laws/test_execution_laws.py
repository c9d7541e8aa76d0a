"""Execution laws: jit ≡ eager, vmap ≡ a Python loop, state structure and dtypes are invariant under
``update``, and equal transforms are ``==``, hash equal and share one jit cache entry."""

import os
import sys

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from strategies import (assert_trees_close, build, dtype_context, eps_of, problems, run,
                        structure_and_dtypes, transform_specs, transforms)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optimizer_registry import ENTRIES  # noqa: E402

candidates = st.one_of(st.sampled_from(ENTRIES).map(lambda e: e.make()), transforms)


def _tol(dtype):
    # compiled and eager programs may fuse differently (FMAs, reassociated reductions): a few ulps
    # of the compute dtype per step, one ulp of the leaf dtype where that crosses a rounding
    return max(4 * eps_of(dtype), 1e-5)


@settings(max_examples=10, deadline=None)
@given(tx=candidates, problem=problems(dtype="float32", steps=(2, 3), max_leaves=3))
def test_jit_equals_eager(tx, problem):
    """jax.jit(tx.update) ≡ tx.update over several steps (to compiled-vs-eager rounding)."""
    params, grads = problem.build()
    got, got_states = run(tx, params, grads, update=jax.jit(tx.update))
    want, want_states = run(tx, params, grads)
    tol = _tol(problem.dtype)
    for t in range(len(grads)):
        assert_trees_close(got[t], want[t], rtol=tol, atol=tol, what=f"updates, step {t}")
        assert_trees_close(got_states[t + 1], want_states[t + 1], rtol=tol, atol=tol,
                           what=f"state, step {t}")


@settings(max_examples=10, deadline=None)
@given(tx=candidates, batch=st.integers(1, 3), problem=problems(steps=(1, 2), max_leaves=3))
def test_vmap_over_parameter_sets_equals_a_loop(tx, batch, problem):
    """vmap(init), vmap(update) over a batch of independent parameter sets ≡ a Python loop."""
    with dtype_context(problem.dtype):
        sets = []
        for i in range(batch):
            problem.seed += 1
            sets.append(problem.build())
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
        params_b = stack([p for p, _ in sets])
        state_b = jax.vmap(tx.init)(params_b)
        states = [tx.init(p) for p, _ in sets]
        tol = _tol(problem.dtype)
        for t in range(problem.steps):
            grads_b = stack([gs[t] for _, gs in sets])
            u_b, state_b = jax.vmap(tx.update)(grads_b, state_b, params_b)
            for i, (p, gs) in enumerate(sets):
                u, states[i] = tx.update(gs[t], states[i], p)
                assert_trees_close(jax.tree.map(lambda x, i=i: x[i], u_b), u, rtol=tol, atol=tol,
                                   what=f"member {i}, step {t}")
                assert_trees_close(jax.tree.map(lambda x, i=i: x[i], state_b), states[i],
                                   rtol=tol, atol=tol, what=f"member {i} state, step {t}")


@settings(max_examples=20, deadline=None)
@given(tx=candidates, problem=problems(steps=(1, 3)))
def test_state_structure_and_dtypes_are_invariant_under_update(tx, problem):
    """The state's treedef and every leaf's shape and dtype never change, and equal
    eval_shape(tx.init); updates keep the gradient's structure, shapes and dtypes."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        abstract = jax.eval_shape(tx.init, params)
        updates, states = run(tx, params, grads)
        want = structure_and_dtypes(abstract)
        for t, s in enumerate(states):
            assert structure_and_dtypes(s) == want, f"state after {t} updates"
        for u, gr in zip(updates, grads):
            assert structure_and_dtypes(u) == structure_and_dtypes(gr)


@settings(max_examples=25, deadline=None)
@given(spec=transform_specs, other=transform_specs)
def test_equal_transforms_are_equal_and_hash_equal(spec, other):
    """Building a transform twice gives == and hash-equal values with equal repr; transforms built
    from different arguments are different (chains of them too)."""
    a, b = build(spec), build(spec)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    ca, cb = gradtx.chain(a, gradtx.scale_by_learning_rate(0.1)), \
        gradtx.chain(b, gradtx.scale_by_learning_rate(0.1))
    assert ca == cb and hash(ca) == hash(cb)
    if spec != other:
        assert build(other) != a


@settings(max_examples=5, deadline=None)
@given(spec=transform_specs)
def test_equal_transforms_share_the_jit_cache(spec):
    """A transform rebuilt with equal arguments hits the same jit cache entry (no recompilation)."""

    def step_static(tx, grads, state, params):
        return tx.update(grads, state, params)

    jitted = jax.jit(step_static, static_argnums=0)
    params = {"w": jnp.ones((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    grads = jax.tree.map(lambda p: p + 0.5, params)
    first, second = build(spec), build(spec)
    jitted(first, grads, first.init(params), params)
    jitted(second, grads, second.init(params), params)
    assert jitted._cache_size() == 1
