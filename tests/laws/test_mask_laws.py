"""Laws of ``masked``, ``partition`` and ``freeze``: decomposition of a transform over parameter groups.

A selected group is always compared with the transform applied to *that group alone*, given as a
flat list of its leaves (in the tree's flattening order), so transforms that couple leaves
(``clip_by_global_norm``, trust ratios, ...) are covered too. Comparisons are eager and exact.
"""

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from strategies import (assert_leaves_equal, assert_trees_equal, dtype_context, problems, run,
                        select_list, transforms)

SETTINGS = settings(max_examples=15, deadline=None)


def _mask_like(tree, bits):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([bool(bits[i % len(bits)]) for i in range(len(leaves))])


@SETTINGS
@given(tx=transforms, problem=problems(), value=st.booleans())
def test_masked_all_true_is_the_transform_and_all_false_is_identity(tx, problem, value):
    """masked(tx, all True) ≡ tx (updates and state); masked(tx, all False) ≡ identity()."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        mask = jax.tree.map(lambda _: value, params)
        got, got_states = run(gradtx.masked(tx, mask), params, grads)
        if value:
            want, want_states = run(tx, params, grads)
        else:
            want, want_states = grads, None
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            if value:
                assert_trees_equal(got_states[t + 1].inner_state, want_states[t + 1],
                                   what=f"state, step {t}")
            else:   # no per-parameter state for unselected leaves
                assert_leaves_equal(got_states[t + 1].inner_state,
                                    run(tx, [], [[]] * (t + 1))[1][-1], what="state")


@SETTINGS
@given(tx=transforms, problem=problems(), bits=st.lists(st.booleans(), min_size=1, max_size=6))
def test_masked_is_the_transform_on_the_selected_subtree(tx, problem, bits):
    """masked(tx, m)(g) = tx(g restricted to m) on selected leaves, g elsewhere (every step)."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        mask = _mask_like(params, bits)
        got, _ = run(gradtx.masked(tx, mask), params, grads)
        sub_params = select_list(params, mask)
        want, _ = run(tx, sub_params, [select_list(g, mask) for g in grads])
        for t in range(len(grads)):
            assert_leaves_equal(select_list(got[t], mask), want[t], what=f"selected, step {t}")
            off = jax.tree.map(lambda m: not m, mask)
            assert_leaves_equal(select_list(got[t], off), select_list(grads[t], off),
                                what=f"unselected, step {t}")


@SETTINGS
@given(tx=transforms, problem=problems())
def test_partition_with_one_label_is_the_transform(tx, problem):
    """partition({"only": tx}, all "only") ≡ tx (updates and state)."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        labels = jax.tree.map(lambda _: "only", params)
        got, got_states = run(gradtx.partition({"only": tx}, labels), params, grads)
        want, want_states = run(tx, params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            assert_leaves_equal(got_states[t + 1].inner_states["only"], want_states[t + 1])


@SETTINGS
@given(a=transforms, b=transforms, c=transforms, problem=problems(),
       picks=st.lists(st.sampled_from("abc"), min_size=1, max_size=6))
def test_partition_is_each_transform_on_its_own_subtree(a, b, c, problem, picks):
    """partition({L: tx_L}, labels)(g) restricted to label L = tx_L(g restricted to L), each step."""
    txs = {"a": a, "b": b, "c": c}
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        leaves, treedef = jax.tree.flatten(params)
        labels = treedef.unflatten([picks[i % len(picks)] for i in range(len(leaves))])
        got, _ = run(gradtx.partition(txs, labels), params, grads)
        for name, tx in txs.items():
            mask = jax.tree.map(lambda x, n=name: x == n, labels)
            want, _ = run(tx, select_list(params, mask), [select_list(g, mask) for g in grads])
            for t in range(len(grads)):
                assert_leaves_equal(select_list(got[t], mask), want[t],
                                    what=f"label {name}, step {t}")


@SETTINGS
@given(tx=transforms, problem=problems(), bits=st.lists(st.booleans(), min_size=1, max_size=6))
def test_freeze_gives_zero_updates_to_frozen_leaves(tx, problem, bits):
    """freeze(tx, m): zero updates (gradient's dtype and shape) on frozen leaves, bit for bit; the
    others get tx applied to the trainable subtree; all frozen ≡ set_to_zero()."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        frozen = _mask_like(params, bits)
        got, _ = run(gradtx.freeze(tx, frozen), params, grads)
        trainable = jax.tree.map(lambda m: not m, frozen)
        want, _ = run(tx, select_list(params, trainable), [select_list(g, trainable)
                                                            for g in grads])
        all_frozen, _ = run(gradtx.freeze(tx, jax.tree.map(lambda _: True, params)), params, grads)
        for t in range(len(grads)):
            assert_leaves_equal(select_list(got[t], frozen),
                                [jnp.zeros_like(g) for g in select_list(grads[t], frozen)],
                                what=f"frozen, step {t}")
            assert_leaves_equal(select_list(got[t], trainable), want[t],
                                what=f"trainable, step {t}")
            assert_trees_equal(all_frozen[t], jax.tree.map(jnp.zeros_like, grads[t]))
