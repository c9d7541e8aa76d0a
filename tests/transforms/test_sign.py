"""Tests of gradtx.scale_by_sign and gradtx.scale_by_lion (closed form, Optax oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradtx.base import EmptyState
from gradtx.transforms.sign import ScaleByLionState, scale_by_lion, scale_by_sign

RNG = np.random.default_rng(1)
GRADS = [RNG.normal(size=(4, 3)) for _ in range(6)]


def test_sign_values_and_dtypes():
    tx = scale_by_sign()
    assert tx.init({"a": jnp.zeros(2)}) == EmptyState()
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        g = jnp.array([2.5, -1e-3, 0.0, -7.0], dtype)
        u, _ = tx.update(g, EmptyState())
        assert u.dtype == dtype
        assert np.asarray(u, np.float32).tolist() == [1.0, -1.0, 0.0, -1.0]


def test_sign_nan_stays_nan():
    u, _ = scale_by_sign().update(jnp.array([jnp.nan, 1.0]), EmptyState())
    assert np.isnan(np.asarray(u)[0]) and np.asarray(u)[1] == 1.0


def test_sign_scale_invariance_and_tree():
    g = {"w": jnp.asarray(GRADS[0], jnp.float32), "b": jnp.asarray(GRADS[1][0], jnp.float32)}
    u1, _ = scale_by_sign().update(g, EmptyState())
    u2, _ = scale_by_sign().update(jax.tree.map(lambda x: 3.7 * x, g), EmptyState())
    for k in g:
        np.testing.assert_array_equal(np.asarray(u1[k]), np.sign(np.asarray(g[k])))
        np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))


@pytest.mark.parametrize("tx", [scale_by_sign(), scale_by_lion()], ids=["sign", "lion"])
def test_complex_raises_naming_transform(tx):
    g = {"z": jnp.ones(2, jnp.complex64)}
    state = tx.init(g)
    with pytest.raises(TypeError, match=rf"{tx.name}: the update at \['z'\] is complex"):
        tx.update(g, state)


def ref_lion(grads, b1, b2):
    m, outs = np.zeros_like(grads[0]), []
    for g in grads:
        outs.append(np.sign(b1 * m + (1 - b1) * g))
        m = b2 * m + (1 - b2) * g
    return outs, m


@pytest.mark.parametrize("b1,b2", [(0.9, 0.99), (0.5, 0.75), (0.0, 0.9), (0.95, 0.0)])
def test_lion_closed_form(b1, b2):
    tx = scale_by_lion(b1=b1, b2=b2)
    state = tx.init(jnp.zeros((4, 3)))
    want, m = ref_lion(GRADS, b1, b2)
    for g, w in zip(GRADS, want):
        u, state = tx.update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_array_equal(np.asarray(u), w)
    np.testing.assert_allclose(np.asarray(state.mu), m, rtol=1e-5, atol=1e-7)
    assert isinstance(state, ScaleByLionState)


def test_lion_update_uses_old_momentum():
    # With b1 = 1 the direction is sign(m_{t-1}): zero on the first step.
    tx = scale_by_lion(b1=1.0, b2=0.5)
    state = tx.init(jnp.zeros(2))
    u, state = tx.update(jnp.array([1.0, -1.0]), state)
    assert np.asarray(u).tolist() == [0.0, 0.0]
    u, state = tx.update(jnp.array([-5.0, 5.0]), state)
    assert np.asarray(u).tolist() == [1.0, -1.0]


def test_lion_matches_optax():
    optax = pytest.importorskip("optax")
    params = {"w": jnp.zeros((4, 3), jnp.float32)}
    ours, otx = scale_by_lion(b1=0.8, b2=0.95), optax.scale_by_lion(b1=0.8, b2=0.95)
    s1, s2 = ours.init(params), otx.init(params)
    step = jax.jit(ours.update)
    for g in GRADS:
        g = {"w": jnp.asarray(g, jnp.float32)}
        u1, s1 = step(g, s1)
        u2, s2 = otx.update(g, s2)
        np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))
        np.testing.assert_allclose(np.asarray(s1.mu["w"]), np.asarray(s2.mu["w"]), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lion_dtypes(dtype):
    params = jnp.zeros(3, dtype)
    tx = scale_by_lion()
    state = tx.init(params)
    assert state.mu.dtype == dtype
    u, state = tx.update(jnp.ones(3, dtype), state)
    assert u.dtype == dtype and state.mu.dtype == dtype
    tx = scale_by_lion(mu_dtype="float32")
    state = tx.init(params)
    u, state = tx.update(jnp.ones(3, dtype), state)
    assert u.dtype == dtype and state.mu.dtype == jnp.float32


def test_lion_eval_shape_and_jit():
    params = {"w": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16)}
    state = jax.eval_shape(scale_by_lion().init, params)
    assert state.mu["w"].dtype == jnp.bfloat16
    tx = scale_by_lion()
    s_e = s_j = tx.init(jnp.zeros((4, 3)))
    step = jax.jit(tx.update)
    for g in GRADS:
        g = jnp.asarray(g, jnp.float32)
        u_e, s_e = tx.update(g, s_e)
        u_j, s_j = step(g, s_j)
        np.testing.assert_array_equal(np.asarray(u_e), np.asarray(u_j))


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(b1=1.5), ValueError, "b1"), (dict(b1=-0.1), ValueError, "b1"),
    (dict(b1=True), TypeError, "b1"),
    (dict(b2=2.0), ValueError, "b2"), (dict(b2=float("nan")), ValueError, "b2"),
    (dict(mu_dtype="int8"), ValueError, "mu_dtype"), (dict(mu_dtype=3), TypeError, "mu_dtype"),
])
def test_lion_bad_hyperparameters(kwargs, exc, arg):
    with pytest.raises(exc, match=f"scale_by_lion: {arg}"):
        scale_by_lion(**kwargs)


def test_values_and_repr():
    assert scale_by_lion(b1=0.5) == scale_by_lion(0.5)
    assert repr(scale_by_lion(b2=0.5)) == "scale_by_lion(b2=0.5)"
    assert repr(scale_by_sign()) == "scale_by_sign()"
    assert hash(scale_by_sign()) == hash(scale_by_sign())


def test_traced_hyperparameters_inside_jit():
    @jax.jit
    def run_traced(b1, b2, g):
        tx = scale_by_lion(b1=b1, b2=b2)
        u, s = tx.update(g, tx.init(g))
        return u, s.mu

    u, mu = run_traced(jnp.float32(0.5), jnp.float32(0.25), jnp.array([2.0, -4.0]))
    assert np.asarray(u).tolist() == [1.0, -1.0]
    np.testing.assert_allclose(np.asarray(mu), [1.5, -3.0])
