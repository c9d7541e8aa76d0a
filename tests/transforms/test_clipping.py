"""Tests of gradtx's clipping primitives: clip, clip_by_global_norm, clip_by_block_rms, AGC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from gradtx.base import EmptyState
from gradtx.transforms.clipping import (adaptive_grad_clip, clip, clip_by_block_rms,
                                        clip_by_global_norm)

RNG = np.random.default_rng(3)


def tree(scale=1.0, dtype=jnp.float32):
    return {"w": jnp.asarray(scale * RNG.normal(size=(4, 3)), dtype),
            "b": jnp.asarray(scale * RNG.normal(size=(3,)), dtype)}


def norm64(t):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(t)))


def apply(tx, updates, params=None):
    return tx.update(updates, tx.init(updates if params is None else params), params)[0]


# ------------------------------------------------------------------------------------- clip

def test_clip_closed_form_and_dtype():
    for dtype in (jnp.bfloat16, jnp.float32):
        g = jnp.array([-3.0, -0.25, 0.0, 0.5, 2.0], dtype)
        u = apply(clip(0.5), g)
        assert u.dtype == dtype
        assert np.asarray(u, np.float32).tolist() == [-0.5, -0.25, 0.0, 0.5, 0.5]


def test_clip_complex_keeps_phase():
    z = jnp.array([3.0 + 4.0j, 0.1 + 0.0j], jnp.complex64)
    u = np.asarray(apply(clip(1.0), z))
    np.testing.assert_allclose(u, [0.6 + 0.8j, 0.1], rtol=1e-6)


def test_clip_zero_delta_zeroes():
    assert np.asarray(apply(clip(0.0), jnp.array([1.0, -2.0]))).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------- clip_by_global_norm

@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), c=st.floats(1e-2, 1e2))
def test_global_norm_properties(scale, c):
    g = tree(scale)
    tx = clip_by_global_norm(c)
    u = apply(tx, g)
    n_in, n_out = norm64(g), norm64(u)
    assert n_out <= c * (1 + 1e-6)
    if n_in <= c:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u, g)
    else:
        np.testing.assert_allclose(n_out, c, rtol=1e-5)
        # Direction is preserved: u is a positive multiple of g.
        ratio = np.asarray(u["w"], np.float64) / np.asarray(g["w"], np.float64)
        np.testing.assert_allclose(ratio, c / n_in, rtol=1e-5)
    # Idempotent (up to float rounding).
    u2 = apply(tx, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5),
                 u2, u)


def test_global_norm_zero_grads_no_nan():
    g = jax.tree.map(jnp.zeros_like, tree())
    for tx in (clip_by_global_norm(1.0), clip_by_global_norm(0.0)):
        u = apply(tx, g)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_global_norm_zero_max_norm_zeroes():
    u = apply(clip_by_global_norm(0.0), tree())
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_global_norm_bf16_accumulates_in_float32():
    g = {"a": jnp.full((64,), 300.0, jnp.bfloat16)}  # sum of squares overflows nothing in f32
    u = apply(clip_by_global_norm(1.0), g)
    assert u["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(norm64(u), 1.0, rtol=1e-2)


def test_global_norm_matches_optax_and_torch():
    optax = pytest.importorskip("optax")
    g = tree(5.0)
    u = apply(clip_by_global_norm(1.5), g)
    v = optax.clip_by_global_norm(1.5).update(g, EmptyState())[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                 u, v)
    torch = pytest.importorskip("torch")
    ps = [torch.nn.Parameter(torch.zeros(x.shape)) for x in jax.tree.leaves(g)]
    for p, x in zip(ps, jax.tree.leaves(g)):
        p.grad = torch.tensor(np.asarray(x))
    torch.nn.utils.clip_grad_norm_(ps, 1.5)
    for p, x in zip(ps, jax.tree.leaves(u)):
        np.testing.assert_allclose(p.grad.numpy(), np.asarray(x), rtol=1e-5)


def test_global_norm_jit_equals_eager():
    tx, g = clip_by_global_norm(0.5), tree(3.0)
    s = tx.init(g)
    a, _ = tx.update(g, s)
    b, _ = jax.jit(tx.update)(g, s)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6),
                 a, b)


# ------------------------------------------------------------------------ clip_by_block_rms

def test_block_rms_closed_form():
    g = tree(4.0)
    u = apply(clip_by_block_rms(0.5), g)
    for k in g:
        x = np.asarray(g[k], np.float64)
        rms = np.sqrt(np.mean(x ** 2))
        np.testing.assert_allclose(np.asarray(u[k]), x / max(1.0, rms / 0.5), rtol=1e-6)
        assert np.sqrt(np.mean(np.asarray(u[k], np.float64) ** 2)) <= 0.5 * (1 + 1e-6)


def test_block_rms_identity_below_and_zero():
    g = {"a": jnp.array([0.1, -0.2]), "z": jnp.zeros(3), "e": jnp.zeros((0,))}
    u = apply(clip_by_block_rms(1.0), g)
    np.testing.assert_array_equal(np.asarray(u["a"]), np.asarray(g["a"]))
    assert np.all(np.asarray(u["z"]) == 0) and u["e"].shape == (0,)


def test_block_rms_matches_optax():
    optax = pytest.importorskip("optax")
    g = tree(3.0, jnp.float32)
    u = apply(clip_by_block_rms(0.7), g)
    v = optax.clip_by_block_rms(0.7).update(g, EmptyState())[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                 u, v)


# ------------------------------------------------------------------------ adaptive_grad_clip

def ref_agc(g, p, clipping, eps, axes):
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    gn = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=True))
    pn = np.maximum(np.sqrt(np.sum(p ** 2, axis=axes, keepdims=True)), eps)
    limit = clipping * pn
    return np.where(gn > limit, g * limit / np.where(gn > 0, gn, 1.0), g)


@pytest.mark.parametrize("shape,axes", [((5,), None), ((4, 3), (0,)), ((2, 3, 4), (0, 1)),
                                        ((2, 2, 3, 4), (0, 1, 2)), (( ), None)])
def test_agc_default_units(shape, axes):
    p = jnp.asarray(RNG.normal(size=shape), jnp.float32)
    g = jnp.asarray(RNG.normal(size=shape), jnp.float32)
    u = apply(adaptive_grad_clip(0.3), g, p)
    np.testing.assert_allclose(np.asarray(u), ref_agc(g, p, 0.3, 1e-3, axes), rtol=1e-5,
                               atol=1e-7)


def test_agc_explicit_axis_torch_layout():
    p = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)   # (out, in)
    g = jnp.asarray(5 * RNG.normal(size=(3, 4)), jnp.float32)
    params, grads = {"w": p, "b": p[:, 0]}, {"w": g, "b": g[:, 0]}
    u = apply(adaptive_grad_clip(0.1, axis=1), grads, params)
    np.testing.assert_allclose(np.asarray(u["w"]), ref_agc(g, p, 0.1, 1e-3, (1,)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u["b"]), ref_agc(g[:, 0], p[:, 0], 0.1, 1e-3, None),
                               rtol=1e-5)


def test_agc_unit_norm_bound_and_zero_safety():
    p = jnp.zeros((3, 2))
    g = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    u = np.asarray(apply(adaptive_grad_clip(0.5, eps=0.1), g, p))
    # Unit 0 has norm sqrt(3) and limit 0.5 * 0.1; unit 1 is zero and stays zero.
    np.testing.assert_allclose(np.linalg.norm(u[:, 0]), 0.05, rtol=1e-6)
    assert np.all(u[:, 1] == 0) and np.all(np.isfinite(u))
    z = np.asarray(apply(adaptive_grad_clip(0.5, eps=0.0), jnp.zeros((3, 2)), p))
    assert np.all(z == 0)


def test_agc_matches_optax():
    optax = pytest.importorskip("optax")
    shapes = {"dense": (6, 4), "bias": (4,), "conv": (3, 3, 2, 4)}
    params = {k: jnp.asarray(RNG.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(RNG.normal(size=s), jnp.float32) for k, s in shapes.items()}
    u = apply(adaptive_grad_clip(0.05), grads, params)
    v = optax.adaptive_grad_clip(0.05).update(grads, EmptyState(), params)[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                         atol=1e-7), u, v)


def test_agc_bf16_and_jit():
    p = jnp.asarray(RNG.normal(size=(4, 3)), jnp.bfloat16)
    g = jnp.asarray(RNG.normal(size=(4, 3)), jnp.bfloat16)
    tx = adaptive_grad_clip(0.1)
    s = tx.init(p)
    a, _ = tx.update(g, s, p)
    b, _ = jax.jit(tx.update)(g, s, p)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_agc_params_none_raises():
    tx = adaptive_grad_clip()
    with pytest.raises(ValueError, match="adaptive_grad_clip.*needs the current parameters"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_agc_axis_out_of_range_raises_naming_leaf():
    tx = adaptive_grad_clip(axis=2)
    p = {"k": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"adaptive_grad_clip: axis=2 is out of range .*\['k'\]"):
        tx.update(p, tx.init(p), p)


# ------------------------------------------------------------------------- validation, repr

@pytest.mark.parametrize("make,exc,arg", [
    (lambda: clip(-1.0), ValueError, "clip: max_delta"),
    (lambda: clip("1"), TypeError, "clip: max_delta"),
    (lambda: clip_by_global_norm(-0.5), ValueError, "clip_by_global_norm: max_norm"),
    (lambda: clip_by_global_norm(float("nan")), ValueError, "clip_by_global_norm: max_norm"),
    (lambda: clip_by_block_rms(0.0), ValueError, "clip_by_block_rms: threshold"),
    (lambda: clip_by_block_rms(None), TypeError, "clip_by_block_rms: threshold"),
    (lambda: adaptive_grad_clip(clipping=0.0), ValueError, "adaptive_grad_clip: clipping"),
    (lambda: adaptive_grad_clip(eps=-1.0), ValueError, "adaptive_grad_clip: eps"),
    (lambda: adaptive_grad_clip(axis=1.5), TypeError, "adaptive_grad_clip: axis"),
    (lambda: adaptive_grad_clip(axis=True), TypeError, "adaptive_grad_clip: axis"),
    (lambda: adaptive_grad_clip(axis=()), ValueError, "adaptive_grad_clip: axis"),
])
def test_bad_hyperparameters(make, exc, arg):
    with pytest.raises(exc, match=arg):
        make()


def test_required_arguments():
    for cls in (clip, clip_by_global_norm, clip_by_block_rms):
        with pytest.raises(TypeError):
            cls()


def test_values_and_repr():
    assert clip_by_global_norm(1.0) == clip_by_global_norm(max_norm=1.0)
    assert repr(clip_by_global_norm(1.0)) == "clip_by_global_norm(max_norm=1.0)"
    assert repr(adaptive_grad_clip(axis=[1, 2])) == "adaptive_grad_clip(axis=(1, 2))"
    assert hash(adaptive_grad_clip(axis=[1, 2])) == hash(adaptive_grad_clip(axis=(1, 2)))
    assert gradtx.chain(clip(1.0)).init(jnp.zeros(2)) == (EmptyState(),)


def test_traced_hyperparameters_inside_jit():
    @jax.jit
    def run_traced(c, g, p):
        outs = []
        for tx in (clip(c), clip_by_global_norm(c), clip_by_block_rms(c), adaptive_grad_clip(c)):
            outs.append(tx.update(g, tx.init(p), p)[0])
        return outs

    g = jnp.array([3.0, 4.0])
    a, b, c, d = run_traced(jnp.float32(0.5), g, jnp.array([2.0, 0.0]))
    assert np.asarray(a).tolist() == [0.5, 0.5]
    np.testing.assert_allclose(np.asarray(b), [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c), g * 0.5 / np.sqrt(12.5), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d), [0.6, 0.8], rtol=1e-6)   # limit 0.5 * 2 = 1


def test_clip_by_global_norm_is_differentiable_at_zero_free_points():
    # Gradients flow through the clip (meta-gradients), finite away from zero norms.
    def f(x):
        u, _ = clip_by_global_norm(1.0).update({"a": x}, EmptyState())
        return jnp.sum(u["a"])

    grad = jax.grad(f)(jnp.array([3.0, 4.0]))
    assert np.all(np.isfinite(np.asarray(grad)))
