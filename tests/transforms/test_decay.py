"""Tests of gradtx.add_decoupled_weight_decay: math, schedules, masks, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.transforms.decay import DecayState, add_decoupled_weight_decay

RNG = np.random.default_rng(2)


def make_tree():
    return {"dense": {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32),
                      "b": jnp.asarray(RNG.normal(size=(2,)), jnp.float32)},
            "norm": {"scale": jnp.asarray(RNG.normal(size=(2,)), jnp.float32)}}


PARAMS = make_tree()
GRADS = make_tree()


def expect(mask_tree, rate):
    """Reference: g + rate * p where the (full) mask tree is True."""
    return jax.tree.map(lambda m, g, p: np.asarray(g, np.float64)
                        + (rate * np.asarray(p, np.float64) if m else 0.0),
                        mask_tree, GRADS, PARAMS)


def check(tx, mask_tree, rate=0.1):
    u, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    want = expect(mask_tree, rate)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), u, want)
    return u, state


FULL_TRUE = {"dense": {"w": True, "b": True}, "norm": {"scale": True}}


def test_unmasked_closed_form():
    u, state = check(add_decoupled_weight_decay(0.1), FULL_TRUE)
    assert isinstance(state, DecayState) and int(state.count) == 1


def test_tree_mask():
    mask = {"dense": {"w": True, "b": False}, "norm": {"scale": False}}
    check(add_decoupled_weight_decay(0.1, mask=mask), mask)


def test_prefix_mask():
    mask = {"dense": True, "norm": False}
    full = {"dense": {"w": True, "b": True}, "norm": {"scale": False}}
    check(add_decoupled_weight_decay(0.1, mask=mask), full)


def test_root_bool_mask():
    check(add_decoupled_weight_decay(0.1, mask=False),
          jax.tree.map(lambda _: False, FULL_TRUE))


def decay_matrices_only(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def test_callable_mask():
    full = {"dense": {"w": True, "b": False}, "norm": {"scale": False}}
    tx = add_decoupled_weight_decay(0.1, mask=decay_matrices_only)
    check(tx, full)
    assert repr(tx) == "add_decoupled_weight_decay(rate=0.1, mask=decay_matrices_only)"


def test_mask_with_numpy_bools_is_hashable_and_equal():
    a = add_decoupled_weight_decay(0.1, mask={"w": np.bool_(True), "b": False})
    b = add_decoupled_weight_decay(0.1, mask={"w": True, "b": False})
    assert a == b and hash(a) == hash(b)
    assert "mask={'b': False, 'w': True}" in repr(a)


def test_masked_matches_gradtx_masked():
    mask = {"dense": {"w": True, "b": False}, "norm": True}
    ours = add_decoupled_weight_decay(0.3, mask=mask)
    ref = gradtx.masked(add_decoupled_weight_decay(0.3), mask)
    u1, _ = ours.update(GRADS, ours.init(PARAMS), PARAMS)
    u2, _ = ref.update(GRADS, ref.init(PARAMS), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u1, u2)


def test_bad_mask_structure_raises():
    tx = add_decoupled_weight_decay(0.1, mask={"dense": True, "other": False})
    with pytest.raises(gradtx.TreeMismatchError, match="add_decoupled_weight_decay"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


def test_bad_mask_leaf_raises():
    with pytest.raises(TypeError, match="add_decoupled_weight_decay: mask"):
        add_decoupled_weight_decay(0.1, mask={"w": "yes"})


def test_optax_oracle():
    optax = pytest.importorskip("optax")
    mask = {"dense": {"w": True, "b": False}, "norm": {"scale": True}}
    ours = add_decoupled_weight_decay(0.05, mask=mask)
    theirs = optax.add_decayed_weights(0.05, mask=mask)
    u1, _ = ours.update(GRADS, ours.init(PARAMS), PARAMS)
    u2, _ = theirs.update(GRADS, theirs.init(PARAMS), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                 u1, u2)


def halving(step):
    return 0.5 ** (jnp.asarray(step, jnp.float32) + 1.0)


def test_schedule_rate_over_steps_and_state_structure():
    tx = add_decoupled_weight_decay(halving)
    p, g = jnp.array([2.0, -4.0]), jnp.zeros(2)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for t in range(4):
        u, state = step(g, state, p)
        np.testing.assert_allclose(np.asarray(u), 0.5 ** (t + 1) * np.array([2.0, -4.0]))
    assert int(state.count) == 4
    assert (jax.tree.structure(tx.init(p))
            == jax.tree.structure(add_decoupled_weight_decay(0.1).init(p)))


def test_params_none_raises_naming_transform():
    tx = add_decoupled_weight_decay(0.1)
    with pytest.raises(ValueError, match="add_decoupled_weight_decay.*needs the current parameters"):
        tx.update(GRADS, tx.init(PARAMS))


@pytest.mark.parametrize("pdtype,gdtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                           (jnp.float16, jnp.float16)])
def test_dtypes(pdtype, gdtype):
    tx = add_decoupled_weight_decay(0.5)
    p = jnp.array([1.0, 2.0], pdtype)
    u, _ = tx.update(jnp.ones(2, gdtype), tx.init(p), p)
    assert u.dtype == gdtype
    np.testing.assert_allclose(np.asarray(u, np.float32), [1.5, 2.0])


def test_jit_equals_eager_and_extra_kwargs():
    tx = add_decoupled_weight_decay(0.2, mask=decay_matrices_only)
    s = tx.init(PARAMS)
    u1, _ = tx.update(GRADS, s, PARAMS, value=3.0)
    u2, _ = jax.jit(tx.update)(GRADS, s, PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u1, u2)


def test_shape_mismatch_with_params_raises():
    tx = add_decoupled_weight_decay(0.1)
    with pytest.raises(gradtx.TreeMismatchError, match="add_decoupled_weight_decay"):
        tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(rate=-1e-3), ValueError, "rate"), (dict(rate=float("inf")), ValueError, "rate"),
    (dict(rate="1e-3"), TypeError, "rate"), (dict(rate=True), TypeError, "rate"),
    (dict(mask=[1, 2]), TypeError, "mask"),
])
def test_bad_hyperparameters(kwargs, exc, arg):
    with pytest.raises(exc, match=f"add_decoupled_weight_decay: {arg}"):
        add_decoupled_weight_decay(**kwargs)


def test_default_and_repr():
    tx = add_decoupled_weight_decay()
    assert tx.rate == 1e-4 and tx.mask is None
    assert repr(tx) == "add_decoupled_weight_decay()"


def test_traced_rate_inside_jit():
    @jax.jit
    def run_traced(rate, g, p):
        tx = add_decoupled_weight_decay(rate, mask={"w": True, "b": False})
        return tx.update(g, tx.init(p), p)[0]

    p = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
    u = run_traced(jnp.float32(0.25), {"w": jnp.ones(1), "b": jnp.ones(1)}, p)
    assert np.asarray(u["w"]).tolist() == [1.5] and np.asarray(u["b"]).tolist() == [1.0]
