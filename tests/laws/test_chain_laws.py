"""Laws of ``chain``: associativity, the identity as its unit, one-member chains, named chains.

All comparisons run eagerly (op by op), where equal programs give bit-identical results, so the
laws are checked with exact equality over several steps, on every dtype.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from strategies import (assert_leaves_equal, assert_trees_equal, dtype_context, problems, run,
                        transforms)

SETTINGS = settings(max_examples=15, deadline=None)


@settings(max_examples=12, deadline=None)
@given(a=transforms, b=transforms, c=transforms, problem=problems(steps=(1, 3)))
def test_chain_is_associative(a, b, c, problem):
    """chain(chain(a, b), c) ≡ chain(a, chain(b, c)) ≡ chain(a, b, c)."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        left, left_states = run(gradtx.chain(gradtx.chain(a, b), c), params, grads)
        right, right_states = run(gradtx.chain(a, gradtx.chain(b, c)), params, grads)
        flat, flat_states = run(gradtx.chain(a, b, c), params, grads)
        for t in range(len(grads)):
            assert_trees_equal(left[t], flat[t], what=f"(ab)c vs abc updates, step {t}")
            assert_trees_equal(right[t], flat[t], what=f"a(bc) vs abc updates, step {t}")
            assert_leaves_equal(left_states[t + 1], flat_states[t + 1], what="(ab)c state")
            assert_leaves_equal(right_states[t + 1], flat_states[t + 1], what="a(bc) state")


@SETTINGS
@given(tx=transforms, problem=problems(), where=st.sampled_from(["left", "right", "both"]))
def test_identity_is_the_unit_of_chain(tx, problem, where):
    """chain(identity(), tx) ≡ tx ≡ chain(tx, identity()); chain() ≡ identity()."""
    members = {"left": (gradtx.identity(), tx), "right": (tx, gradtx.identity()),
               "both": (gradtx.identity(), tx, gradtx.identity())}[where]
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, got_states = run(gradtx.chain(*members), params, grads)
        want, want_states = run(tx, params, grads)
        empty, _ = run(gradtx.chain(), params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            assert_leaves_equal(got_states[t + 1], want_states[t + 1], what=f"state, step {t}")
            assert_trees_equal(empty[t], grads[t], what=f"chain() updates, step {t}")


@SETTINGS
@given(tx=transforms, problem=problems())
def test_chain_of_one_is_the_transform(tx, problem):
    """chain(tx) ≡ tx: same updates, and its state is the 1-tuple of tx's state."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, got_states = run(gradtx.chain(tx), params, grads)
        want, want_states = run(tx, params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            assert isinstance(got_states[t + 1], tuple) and len(got_states[t + 1]) == 1
            assert_trees_equal(got_states[t + 1][0], want_states[t + 1], what=f"state, step {t}")


@SETTINGS
@given(a=transforms, b=transforms, problem=problems())
def test_named_chain_equals_chain(a, b, problem):
    """named_chain((n1, a), (n2, b)) ≡ chain(a, b); its state is {n1: state_a, n2: state_b}."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, got_states = run(gradtx.named_chain(("first", a), ("second", b)), params, grads)
        want, want_states = run(gradtx.chain(a, b), params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"updates, step {t}")
            assert_trees_equal(got_states[t + 1]["first"], want_states[t + 1][0])
            assert_trees_equal(got_states[t + 1]["second"], want_states[t + 1][1])
