"""Tests of gradtx.scale_by_trust_ratio: LAMB and LARS forms, zero norms, bounds, oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from gradtx.transforms.trust_ratio import scale_by_trust_ratio

RNG = np.random.default_rng(4)


def tree(scale=1.0, dtype=jnp.float32):
    return {"w": jnp.asarray(scale * RNG.normal(size=(4, 3)), dtype),
            "b": jnp.asarray(scale * RNG.normal(size=(3,)), dtype)}


def apply(tx, updates, params):
    return tx.update(updates, tx.init(params), params)[0]


def n64(x):
    return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


@settings(max_examples=20, deadline=None)
@given(su=st.floats(1e-3, 1e3), sp=st.floats(1e-3, 1e3))
def test_lamb_output_norm_equals_param_norm(su, sp):
    u, p = tree(su), tree(sp)
    out = apply(scale_by_trust_ratio(), u, p)
    for k in u:
        np.testing.assert_allclose(n64(out[k]), n64(p[k]), rtol=1e-5)
        # Same direction as the input update.
        np.testing.assert_allclose(np.asarray(out[k]) * n64(u[k]) / n64(p[k]),
                                   np.asarray(u[k]), rtol=1e-4, atol=1e-6)


def test_lamb_closed_form_with_coefficient_eps_min_norm():
    u, p = tree(0.2), tree(3.0)
    tx = scale_by_trust_ratio(trust_coefficient=0.01, eps=0.5, min_norm=1.0)
    out = apply(tx, u, p)
    for k in u:
        r = 0.01 * max(n64(p[k]), 1.0) / (max(n64(u[k]), 1.0) + 0.5)
        np.testing.assert_allclose(np.asarray(out[k]), r * np.asarray(u[k], np.float64), rtol=1e-5)


def test_zero_norms_give_ratio_one_without_nan():
    params = {"zero_p": jnp.zeros(3), "zero_u": jnp.ones(3), "both": jnp.zeros(2)}
    updates = {"zero_p": jnp.array([1.0, -2.0, 0.5]), "zero_u": jnp.zeros(3), "both": jnp.zeros(2)}
    for tx in (scale_by_trust_ratio(), scale_by_trust_ratio(max_ratio=0.1, min_ratio=0.05),
               scale_by_trust_ratio(form="lars", weight_decay=0.1, trust_coefficient=0.001),
               scale_by_trust_ratio(eps=1e-8)):
        out = apply(tx, updates, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(updates[k]))


def test_ratio_bounds():
    p = {"big": jnp.full((4,), 100.0), "small": jnp.full((4,), 1e-3), "mid": jnp.full((4,), 1.0)}
    u = jax.tree.map(jnp.ones_like, p)                        # ‖u‖ = 2 per leaf
    out = apply(scale_by_trust_ratio(min_ratio=0.1, max_ratio=2.0), u, p)
    np.testing.assert_allclose(np.asarray(out["big"]), 2.0, rtol=1e-6)   # r = 100 -> 2
    np.testing.assert_allclose(np.asarray(out["small"]), 0.1, rtol=1e-6)  # r = 1e-3 -> 0.1
    np.testing.assert_allclose(np.asarray(out["mid"]), 1.0, rtol=1e-6)   # r = 1 inside


def test_max_ratio_inf_allowed():
    tx = scale_by_trust_ratio(max_ratio=float("inf"))
    out = apply(tx, {"a": jnp.ones(4)}, {"a": jnp.full((4,), 3.0)})
    np.testing.assert_allclose(np.asarray(out["a"]), 3.0, rtol=1e-6)


def lars_ref(g, p, tc, wd, eps):
    """The LARS paper's update direction for one layer: local_lr * (g + wd * p)."""
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    local = tc * n64(p) / (n64(g) + wd * n64(p) + eps)
    return local * (g + wd * p)


def test_lars_form_matches_paper():
    g, p = tree(0.5), tree(2.0)
    tc, wd, eps = 0.001, 5e-4, 1e-9
    tx = gradtx.chain(gradtx.add_decoupled_weight_decay(wd),
                      scale_by_trust_ratio(form="lars", weight_decay=wd, trust_coefficient=tc,
                                           eps=eps))
    out = apply(tx, g, p)
    for k in g:
        np.testing.assert_allclose(np.asarray(out[k]), lars_ref(g[k], p[k], tc, wd, eps),
                                   rtol=1e-5)


def test_lars_zero_gradient_uses_decay_norm():
    # g = 0: the paper's local lr is tc / wd, applied to wd * p.
    p = {"w": jnp.array([3.0, 4.0])}
    g = {"w": jnp.zeros(2)}
    tx = gradtx.chain(gradtx.add_decoupled_weight_decay(0.5),
                      scale_by_trust_ratio(form="lars", weight_decay=0.5, trust_coefficient=0.25))
    out = apply(tx, g, p)
    np.testing.assert_allclose(np.asarray(out["w"]), 0.25 / 0.5 * 0.5 * np.array([3.0, 4.0]),
                               rtol=1e-6)


def test_lars_with_zero_decay_equals_lamb_form():
    g, p = tree(), tree(3.0)
    a = apply(scale_by_trust_ratio(form="lars", trust_coefficient=0.02, eps=1e-3), g, p)
    b = apply(scale_by_trust_ratio(trust_coefficient=0.02, eps=1e-3), g, p)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6),
                 a, b)


def test_matches_optax_trust_ratio():
    optax = pytest.importorskip("optax")
    g, p = tree(), tree(2.0)
    for kw in (dict(), dict(trust_coefficient=0.1, eps=1e-2), dict(min_norm=5.0)):
        a = apply(scale_by_trust_ratio(**kw), g, p)
        o = optax.scale_by_trust_ratio(**kw)
        b = o.update(g, o.init(p), p)[0]
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                             rtol=1e-6), a, b)


def test_expresses_optax_lars():
    optax = pytest.importorskip("optax")
    lr, wd, tc, eps, mom = 0.1, 1e-2, 0.02, 1e-6, 0.9
    ours = gradtx.chain(gradtx.add_decoupled_weight_decay(wd),
                        scale_by_trust_ratio(trust_coefficient=tc, eps=eps),
                        gradtx.scale_by_learning_rate(lr), gradtx.trace(mom))
    theirs = optax.lars(lr, weight_decay=wd, weight_decay_mask=True, trust_coefficient=tc,
                        eps=eps, trust_ratio_mask=True, momentum=mom)
    p = tree(2.0)
    s1, s2 = ours.init(p), theirs.init(p)
    p1 = p2 = p
    step = jax.jit(ours.update)
    for _ in range(3):
        g = tree()
        u1, s1 = step(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = gradtx.apply_updates(p1, u1), gradtx.apply_updates(p2, u2)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                                                         atol=1e-7), p1, p2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_keeps_dtype(dtype):
    u, p = tree(1e-2, dtype), tree(10.0, dtype)
    out = apply(scale_by_trust_ratio(), u, p)
    for k in u:
        assert out[k].dtype == dtype
        np.testing.assert_allclose(n64(out[k]), n64(p[k]), rtol=2e-2)


def test_jit_equals_eager_and_vmap():
    tx = scale_by_trust_ratio(form="lars", weight_decay=1e-3, trust_coefficient=0.01)
    u, p = tree(), tree(4.0)
    s = tx.init(p)
    a, _ = tx.update(u, s, p)
    b, _ = jax.jit(tx.update)(u, s, p)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6),
                 a, b)
    # vmap over a batch of independent problems equals the per-problem result.
    ub = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), u)
    pb = jax.tree.map(lambda x: jnp.stack([x, x]), p)
    vb = jax.vmap(lambda uu, pp: tx.update(uu, s, pp)[0])(ub, pb)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x[0]), np.asarray(y),
                                                         rtol=1e-6), vb, a)


def test_params_none_raises_naming_transform():
    tx = scale_by_trust_ratio()
    with pytest.raises(ValueError, match="scale_by_trust_ratio.*needs the current parameters"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_structure_mismatch_raises():
    tx = scale_by_trust_ratio()
    with pytest.raises(gradtx.TreeMismatchError, match="scale_by_trust_ratio.*params"):
        tx.update({"a": jnp.ones(2)}, tx.init(None), {"b": jnp.ones(2)})


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(min_norm=-1.0), ValueError, "min_norm"),
    (dict(trust_coefficient=-0.1), ValueError, "trust_coefficient"),
    (dict(trust_coefficient="1"), TypeError, "trust_coefficient"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(min_ratio=-1.0), ValueError, "min_ratio"),
    (dict(max_ratio=-1.0), ValueError, "max_ratio"),
    (dict(min_ratio=2.0, max_ratio=1.0), ValueError, "min_ratio=2.0 is greater than max_ratio"),
    (dict(form="adam"), ValueError, "form"),
    (dict(form="lars", weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(weight_decay=1e-4), ValueError, "weight_decay=0.0001 is only used by form='lars'"),
])
def test_bad_hyperparameters(kwargs, exc, arg):
    with pytest.raises(exc, match=f"scale_by_trust_ratio: {arg}"):
        scale_by_trust_ratio(**kwargs)


def test_values_and_repr():
    assert scale_by_trust_ratio() == scale_by_trust_ratio(form="lamb")
    assert repr(scale_by_trust_ratio(form="lars", weight_decay=0.5)) == (
        "scale_by_trust_ratio(form='lars', weight_decay=0.5)")
    assert repr(scale_by_trust_ratio(min_ratio=0.0)) == "scale_by_trust_ratio(min_ratio=0.0)"


def test_traced_hyperparameters_inside_jit():
    @jax.jit
    def run_traced(lo, hi, wd, u, p):
        tx = scale_by_trust_ratio(min_ratio=lo, max_ratio=hi, form="lars", weight_decay=wd)
        return tx.update(u, tx.init(p), p)[0]

    # ‖p‖ = 5, g = u - wd p = 0, so r = 5 / (0 + 1 * 5) = 1 -> clipped up to min_ratio 2.
    p = jnp.array([3.0, 4.0])
    out = run_traced(jnp.float32(2.0), jnp.float32(3.0), jnp.float32(1.0), p, p)
    np.testing.assert_allclose(np.asarray(out), 2.0 * np.asarray(p), rtol=1e-6)
