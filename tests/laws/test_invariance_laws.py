"""Invariance laws of the normalising primitives: scale invariance of Adam, sign and Lion; oddness of
sign; the trust ratio's per-leaf norm; global-norm clipping's bound, idempotence and identity."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from strategies import (_np, assert_trees_close, assert_trees_equal, dtype_context, dtypes,
                        eps_of, nonempty_shapes, problems, run, scaled, wide_exponent_dtypes)

SETTINGS = settings(max_examples=15, deadline=None)

adam_betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999))


def _adam(b1, b2, nesterov, amsgrad, dtype):
    # eps = 0 and eps_root = 0 is rejected (0/0 on coordinates whose gradient was always 0);
    # eps_root = 1e-30 is below half an ulp of every v̂ these gradients (|g| >= 1e-2·2^-8) give,
    # so sqrt(v̂ + eps_root) == sqrt(v̂) in float32: this *is* the eps -> 0 limit.
    state_dtype = "float32" if dtype == "float16" else None  # float16 moments underflow
    return gradtx.scale_by_adam(b1=b1, b2=b2, eps=0.0, eps_root=1e-30, nesterov=nesterov,
                                amsgrad=amsgrad, mu_dtype=state_dtype, nu_dtype=state_dtype)


@SETTINGS
@given(betas=adam_betas, nesterov=st.booleans(), amsgrad=st.booleans(), k=st.integers(-8, 8),
       dtype=wide_exponent_dtypes, data=st.data())
def test_adam_is_scale_invariant_exactly_for_powers_of_two(betas, nesterov, amsgrad, k, dtype,
                                                            data):
    """scale_by_adam(eps=0)(c·g_1..c·g_n) = scale_by_adam(eps=0)(g_1..g_n), bit for bit, c = 2^k.

    With eps = eps_root = 0, m̂ scales by c, √v̂ by c: the ratio is invariant; scaling by a power
    of two commutes with every rounding, so floating point keeps the law exactly (non-zero
    gradients, no overflow/underflow)."""
    problem = data.draw(problems(dtype=dtype, low=1e-2, zeros=0.0))
    tx = _adam(*betas, nesterov, amsgrad, dtype)
    with dtype_context(dtype):
        params, grads = problem.build()
        out, _ = run(tx, params, grads)
        out_c, _ = run(tx, params, [scaled(g, 2.0 ** k) for g in grads])
        for t in range(len(grads)):
            assert_trees_equal(out_c[t], out[t], what=f"step {t}")


@SETTINGS
@given(betas=adam_betas, nesterov=st.booleans(), c=st.floats(1e-3, 1e3),
       problem=problems(low=1e-2, zeros=0.0))
def test_adam_is_scale_invariant(betas, nesterov, c, problem):
    """scale_by_adam(eps=0)(c·g) ≈ scale_by_adam(eps=0)(g) for any c > 0, within rounding of the
    gradient and of the moments' storage dtype (a few ulps per step; outputs are O(1))."""
    tx = _adam(*betas, nesterov, False, problem.dtype)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        out, _ = run(tx, params, grads)
        out_c, _ = run(tx, params, [scaled(g, c) for g in grads])
        eps = max(eps_of(problem.dtype), eps_of("float32"))
        for t in range(len(grads)):
            tol = 8 * (t + 2) * eps
            # |m̂/√v̂| <= 1/sqrt(1 - b2) (or (1 + b1)/... for nesterov): bound the absolute error
            bound = 2.0 / np.sqrt(1.0 - betas[1])
            assert_trees_close(out_c[t], out[t], rtol=tol, atol=tol * bound, what=f"step {t}")


@SETTINGS
@given(c=st.floats(1e-3, 1e3), problem=problems())
def test_sign_is_scale_invariant(c, problem):
    """scale_by_sign(c·g) = scale_by_sign(g) for every c > 0, bit for bit (zeros included)."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        tx = gradtx.scale_by_sign()
        for g in grads:
            assert_trees_equal(tx.update(scaled(g, c), tx.init(params))[0],
                               tx.update(g, tx.init(params))[0])


@SETTINGS
@given(problem=problems())
def test_sign_is_odd(problem):
    """scale_by_sign(-g) = -scale_by_sign(g), and its values are in {-1, 0, 1}."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        tx = gradtx.scale_by_sign()
        for g in grads:
            pos = tx.update(g, tx.init(params))[0]
            neg = tx.update(jax.tree.map(jnp.negative, g), tx.init(params))[0]
            assert_trees_equal(neg, jax.tree.map(jnp.negative, pos))
            for x in jax.tree.leaves(pos):
                assert set(np.unique(_np(x)).tolist()) <= {-1.0, 0.0, 1.0}


@SETTINGS
@given(b1=st.floats(0.0, 1.0), b2=st.floats(0.0, 1.0), k=st.integers(-8, 8),
       dtype=wide_exponent_dtypes, data=st.data())
def test_lion_is_scale_invariant(b1, b2, k, dtype, data):
    """scale_by_lion(c·g_1..c·g_n) = scale_by_lion(g_1..g_n) for c = 2^k, bit for bit; the momentum
    scales by c exactly.

    (For a general c > 0 the law holds in exact arithmetic; in floating point a rounding can flip
    the sign of an interpolation that is within an ulp of 0, so only powers of two are exact.)"""
    problem = data.draw(problems(dtype=dtype))
    tx = gradtx.scale_by_lion(b1=b1, b2=b2)
    c = 2.0 ** k
    with dtype_context(dtype):
        params, grads = problem.build()
        out, states = run(tx, params, grads)
        out_c, states_c = run(tx, params, [scaled(g, c) for g in grads])
        for t in range(len(grads)):
            assert_trees_equal(out_c[t], out[t], what=f"updates, step {t}")
            assert_trees_equal(states_c[t + 1].mu, scaled(states[t + 1].mu, c))


@SETTINGS
@given(coeff=st.floats(0.1, 4.0), problem=problems(low=1e-2, zeros=0.0))
def test_trust_ratio_output_has_the_parameter_norm(coeff, problem):
    """scale_by_trust_ratio(trust_coefficient=η)(u)_l has norm η·‖p_l‖ for every leaf l with
    ‖p_l‖ > 0 and ‖u_l‖ > 0 (within the rounding of the leaf dtype), and u_l unchanged otherwise
    (empty leaves)."""
    tx = gradtx.scale_by_trust_ratio(trust_coefficient=coeff)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        eps = eps_of(problem.dtype)
        for g in grads:
            out = tx.update(g, tx.init(params), params)[0]
            for p, u, o in zip(jax.tree.leaves(params), jax.tree.leaves(g), jax.tree.leaves(out)):
                p_norm, u_norm = np.linalg.norm(_np(p)), np.linalg.norm(_np(u))
                if p_norm > 0 and u_norm > 0:
                    np.testing.assert_allclose(np.linalg.norm(_np(o)), coeff * p_norm,
                                               rtol=4 * eps + 1e-6)
                    # and the direction is kept
                    np.testing.assert_allclose(_np(o) * u_norm, _np(u) * np.linalg.norm(_np(o)),
                                               rtol=4 * eps + 1e-6, atol=1e-6 * u_norm)
                else:
                    assert_trees_equal(o, u)


@SETTINGS
@given(shape=nonempty_shapes, dtype=dtypes, seed=st.integers(0, 2 ** 31))
def test_trust_ratio_is_identity_where_a_norm_is_zero(shape, dtype, seed):
    """Where ‖p‖ = 0 or ‖u‖ = 0 the update passes unchanged (never NaN, never frozen)."""
    rng = np.random.default_rng(seed)
    tx = gradtx.scale_by_trust_ratio()
    with dtype_context(dtype):
        nonzero = jnp.asarray(rng.uniform(0.5, 2.0, shape), dtype)
        zero = jnp.zeros(shape, dtype)
        params = {"p0": zero, "u0": nonzero}
        grads = {"p0": nonzero, "u0": zero}
        out = tx.update(grads, tx.init(params), params)[0]
        assert_trees_equal(out, grads)


max_norms = st.one_of(st.just(0.0), st.floats(1e-3, 5.0))


@SETTINGS
@given(max_norm=max_norms, problem=problems())
def test_clip_by_global_norm_bounds_the_norm(max_norm, problem):
    """‖clip_by_global_norm(c)(g)‖ <= c up to rounding: the final rounding to the leaf dtype, and
    float32 rounding of the factor c/‖g‖ (also for float64 leaves; see the x64 test below)."""
    tx = gradtx.clip_by_global_norm(max_norm)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        eps = max(eps_of(problem.dtype), eps_of("float32"))
        for g in grads:
            out = tx.update(g, tx.init(params))[0]
            norm = float(gradtx.tree.global_norm(out))
            assert norm <= max_norm * (1 + 2 * eps) + 1e-30, (norm, max_norm)
            if float(gradtx.tree.global_norm(g)) > max_norm:   # clipped: the norm is c
                np.testing.assert_allclose(norm, max_norm, rtol=2 * eps + 1e-6)


@SETTINGS
@given(max_norm=max_norms, problem=problems())
def test_clip_by_global_norm_is_idempotent(max_norm, problem):
    """clip(clip(g)) = clip(g), within rounding (the first clip's output has norm c up to rounding,
    so the second rescales by at most 1 ± a few ulps of the leaf dtype / of float32)."""
    tx = gradtx.clip_by_global_norm(max_norm)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        eps = max(eps_of(problem.dtype), eps_of("float32"))
        for g in grads:
            once = tx.update(g, tx.init(params))[0]
            twice = tx.update(once, tx.init(params))[0]
            assert_trees_close(twice, once, rtol=4 * eps, atol=0.0)


@SETTINGS
@given(margin=st.floats(1.0, 4.0), problem=problems())
def test_clip_by_global_norm_is_identity_below_the_threshold(margin, problem):
    """clip_by_global_norm(c)(g) = g bit for bit when ‖g‖ <= c (here c = margin·‖g‖)."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        for g in grads:
            tx = gradtx.clip_by_global_norm(float(gradtx.tree.global_norm(g)) * margin)
            assert_trees_equal(tx.update(g, tx.init(params))[0], g)


@settings(max_examples=10, deadline=None)
@given(max_norm=st.floats(0.5, 5.0), problem=problems(dtype="float64", low=1.0, zeros=0.0))
def test_clip_by_global_norm_float64_is_exact_to_float64_rounding(max_norm, problem):
    """Under x64, clipped float64 updates have norm c up to float64 rounding, as the docstring of
    clip_by_global_norm states ("min(n, c) up to the final rounding to each update's dtype"); c is
    the float32 value of ``max_norm`` (every hyperparameter enters arithmetic as float32), but the
    norm and the factor c/‖g‖ are formed in float64.
    """
    tx = gradtx.clip_by_global_norm(max_norm)
    with dtype_context("float64"):
        params, grads = problem.build()
        for g in grads:
            if float(gradtx.tree.global_norm(g)) <= max_norm:
                continue
            out = tx.update(g, tx.init(params))[0]
            np.testing.assert_allclose(float(gradtx.tree.global_norm(out)),
                                       float(np.float32(max_norm)), rtol=1e-13)
