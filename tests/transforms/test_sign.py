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


# Lion's direction read from the new moment: sign(β₁m' + (β₂-β₁)g) = sign(β₂(β₁m + (1-β₁)g)) when
# 0 < β₁ < β₂ and m is stored in its compute dtype; the literal formula otherwise.

def _literal_lion(b1, b2, g, m):
    c1, c2 = jnp.float32(b1), jnp.float32(b2)
    return jnp.sign(c1 * m + (1.0 - c1) * g), c2 * m + (1.0 - c2) * g


def _near_cancellation(n, b1, seed):
    # m and g drawn so that β₁m + (1-β₁)g is often within a few ulps of zero: the only place the
    # two evaluation orders can disagree.
    rng = np.random.default_rng(seed)
    m = rng.normal(size=n).astype(np.float32)
    g = (-b1 * m.astype(np.float64) / (1 - b1)).astype(np.float32)
    nudge = rng.integers(-3, 4, size=n).astype(np.float32)
    other = rng.normal(size=n).astype(np.float32)
    return m, np.where(rng.random(n) < 0.5, np.nextafter(g, g + nudge), other)


@pytest.mark.parametrize("b1,b2", [(0.9, 0.99), (0.95, 0.98), (0.5, 0.75), (0.01, 0.02)])
def test_lion_direction_from_new_momentum_has_the_exact_sign_outside_rounding(b1, b2):
    m, g = _near_cancellation(200_000, b1, seed=int(b1 * 100))
    tx = scale_by_lion(b1=b1, b2=b2)
    u, state = jax.jit(tx.update)(jnp.asarray(g), ScaleByLionState(jnp.asarray(m)))
    m64, g64 = m.astype(np.float64), g.astype(np.float64)
    exact = b1 * m64 + (1 - b1) * g64
    # float32 rounding of either evaluation order stays below this (docs of scale_by_lion)
    bound = 8 * np.finfo(np.float32).eps * (np.abs(m64) + np.abs(g64)) / b2
    clear = np.abs(exact) > bound
    assert clear.mean() > 0.4 and (~clear).sum() > 1000   # both regimes are exercised
    np.testing.assert_array_equal(np.asarray(u)[clear], np.sign(exact)[clear])
    # the new moment itself is the literal one, bit for bit (op by op: under jit XLA may contract
    # β₂m + (1-β₂)g into a fused multiply-add)
    _, state = tx.update(jnp.asarray(g), ScaleByLionState(jnp.asarray(m)))
    _, literal_m = _literal_lion(b1, b2, jnp.asarray(g), jnp.asarray(m))
    np.testing.assert_array_equal(np.asarray(state.mu), np.asarray(literal_m))


@pytest.mark.parametrize("b1,b2,mu_dtype,params_dtype", [
    (0.95, 0.9, None, jnp.float32),        # β₁ > β₂
    (0.9, 0.9, None, jnp.float32),         # β₁ = β₂: (β₂-β₁)·g would be 0·inf for g = inf
    (0.0, 0.9, None, jnp.float32),         # β₁ = 0: β₁·m' would be 0·inf for m' = inf
    (0.9, 0.0, None, jnp.float32),         # β₂ = 0: m' forgets m
    (0.9, 0.99, "bfloat16", jnp.float32),  # m' is rounded when stored
    (0.9, 0.99, None, jnp.bfloat16),       # the same, m in the parameters' bfloat16
])
def test_lion_literal_formula_where_the_new_moment_cannot_give_the_direction(
        b1, b2, mu_dtype, params_dtype):
    m, g = _near_cancellation(20_000, 0.9 if b1 == 0 else b1, seed=3)
    tx = scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype)
    state = tx.init(jnp.zeros(g.shape, params_dtype))
    m = jnp.asarray(m).astype(state.mu.dtype)
    g = jnp.asarray(g).astype(params_dtype)
    u, _ = tx.update(g, ScaleByLionState(m))
    want, _ = _literal_lion(b1, b2, g.astype(jnp.float32), m.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(want))


def test_lion_traced_betas_use_the_literal_formula():
    m, g = _near_cancellation(20_000, 0.9, seed=4)
    u = jax.jit(lambda b1, b2: scale_by_lion(b1=b1, b2=b2).update(
        jnp.asarray(g), ScaleByLionState(jnp.asarray(m)))[0])(jnp.float32(0.9), jnp.float32(0.99))
    want, _ = _literal_lion(0.9, 0.99, jnp.asarray(g), jnp.asarray(m))
    np.testing.assert_array_equal(np.asarray(u), np.asarray(want))


def test_lion_direction_from_new_momentum_keeps_nonfinite_signs():
    inf, nan = np.inf, np.nan
    m = jnp.array([0.5, 0.5, inf, inf, -inf, 1.0, nan, 0.0, 0.0, -0.0], jnp.float32)
    g = jnp.array([inf, -inf, 1.0, -inf, 2.0, nan, 1.0, 0.0, -0.0, -0.0], jnp.float32)
    u, state = scale_by_lion().update(g, ScaleByLionState(m))
    want, want_m = _literal_lion(0.9, 0.99, g, m)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(state.mu), np.asarray(want_m))


def test_lion_reads_the_old_moment_where_the_compiler_merges_sibling_loops(monkeypatch):
    # Under gradtx.xla_flags("cpu") the literal formula's two loops (direction, m') both read the
    # old moment and merge into one; the new-moment order would keep them apart.
    from gradtx import compiler
    m, g = (jnp.asarray(x) for x in _near_cancellation(50_000, 0.9, seed=5))
    want, _ = _literal_lion(0.9, 0.99, g, m)
    plain, _ = scale_by_lion().update(g, ScaleByLionState(m))
    assert int(jnp.sum(plain != want)) > 0   # the orders do differ, in the last ulps
    monkeypatch.setattr(compiler, "_merges_siblings_only", lambda backend: True)
    merged, _ = scale_by_lion().update(g, ScaleByLionState(m))
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(want))
