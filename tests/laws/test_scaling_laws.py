"""Scaling laws: ``scale`` is a homomorphism, the learning rate is ``scale(-lr)``, and the linear
stateful transforms (``trace``, ``ema``) commute with scaling the gradient sequence."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from strategies import (assert_trees_close, assert_trees_equal, dtype_context, eps_of, problems,
                        run, scaled, wide_exponent_dtypes, dtypes)

SETTINGS = settings(max_examples=15, deadline=None)

factors = st.floats(0.1, 10.0).flatmap(lambda m: st.sampled_from([m, -m]))


@SETTINGS
@given(a=factors, b=factors, problem=problems())
def test_scale_is_a_homomorphism(a, b, problem):
    """chain(scale(a), scale(b)) ≡ scale(a·b), up to one rounding per scale in the leaf dtype.

    Each ``scale`` rounds its product once to the update's dtype, so the two sides differ by at
    most about 2 ulps of that dtype (relative), plus the dtype's subnormal spacing (float16).
    Factors are float32 values (``numerics.value_at``) even for float64 updates, so under x64
    the factors themselves carry float32 rounding: ``f32(a)·f32(b)`` vs ``f32(a·b)``.
    """
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, states = run(gradtx.chain(gradtx.scale(a), gradtx.scale(b)), params, grads)
        want, _ = run(gradtx.scale(a * b), params, grads)
        eps = max(eps_of(problem.dtype), eps_of("float32"))
        for t in range(len(grads)):
            assert_trees_close(got[t], want[t], rtol=3 * eps, atol=1e-6 * abs(a * b) * (
                problem.dtype == "float16"), what=f"step {t}")
        assert states[-1] == (gradtx.EmptyState(), gradtx.EmptyState())


@SETTINGS
@given(a=st.integers(-6, 6), b=st.integers(-6, 6), sign=st.sampled_from([1.0, -1.0]),
       problem=problems(dtype="float32"))
def test_scale_by_powers_of_two_composes_exactly(a, b, sign, problem):
    """chain(scale(2^a), scale(±2^b)) ≡ scale(±2^(a+b)) bit for bit (float32: no rounding)."""
    params, grads = problem.build()
    got, _ = run(gradtx.chain(gradtx.scale(2.0 ** a), gradtx.scale(sign * 2.0 ** b)), params,
                 grads)
    want, _ = run(gradtx.scale(sign * 2.0 ** (a + b)), params, grads)
    for t in range(len(grads)):
        assert_trees_equal(got[t], want[t], what=f"step {t}")


@SETTINGS
@given(lr=st.floats(0.0, 10.0), problem=problems())
def test_learning_rate_is_scale_by_minus_lr(lr, problem):
    """scale_by_learning_rate(lr) ≡ scale(-lr), bit for bit, at every step."""
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, states = run(gradtx.scale_by_learning_rate(lr), params, grads)
        want, _ = run(gradtx.scale(-lr), params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"step {t}")
        assert int(states[-1].count) == len(grads)


@SETTINGS
@given(peak=st.floats(0.0, 2.0), warmup=st.integers(0, 3), decay=st.integers(1, 5),
       problem=problems(steps=(1, 6)))
def test_learning_rate_schedule_is_schedule_then_negation(peak, warmup, decay, problem):
    """scale_by_learning_rate(s) ≡ chain(scale_by_schedule(s), scale(-1)): the sign flip is the
    only thing the learning rate adds (bit for bit, every step)."""
    s = gradtx.schedules.warmup_cosine(peak, warmup_steps=warmup, decay_steps_after_warmup=decay)
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        got, _ = run(gradtx.scale_by_learning_rate(s), params, grads)
        want, _ = run(gradtx.chain(gradtx.scale_by_schedule(s), gradtx.scale(-1.0)), params, grads)
        for t in range(len(grads)):
            assert_trees_equal(got[t], want[t], what=f"step {t}")


linear_transforms = st.one_of(
    st.builds(gradtx.trace, decay=st.floats(0.0, 0.99), nesterov=st.booleans(),
              dampening=st.floats(0.0, 0.9)),
    st.builds(gradtx.ema, decay=st.floats(0.0, 0.99), debias=st.booleans()),
)


@SETTINGS
@given(tx=linear_transforms, k=st.integers(-8, 8), sign=st.sampled_from([1.0, -1.0]),
       dtype=wide_exponent_dtypes, data=st.data())
def test_linear_transforms_commute_with_powers_of_two_exactly(tx, k, sign, dtype, data):
    """tx(c·g_1..c·g_n) = c·tx(g_1..g_n) and state(c·g) = c·state(g), bit for bit, for c = ±2^k.

    Scaling by a power of two commutes with every rounding (no overflow or subnormals in the
    float32/bfloat16/float64 exponent range for these magnitudes), so for ``trace`` and ``ema``,
    which are linear in the gradient sequence, the law is exact in floating point too.
    """
    problem = data.draw(problems(dtype=dtype, low=1e-3, steps=(1, 6)))
    c = sign * 2.0 ** k
    with dtype_context(dtype):
        params, grads = problem.build()
        out, states = run(tx, params, grads)
        out_c, states_c = run(tx, params, [scaled(g, c) for g in grads])
        for t in range(len(grads)):
            assert_trees_equal(out_c[t], scaled(out[t], c), what=f"updates, step {t}")
            assert_trees_equal(states_c[t + 1][1], scaled(states[t + 1][1], c),
                               what=f"accumulator, step {t}")
            assert_trees_equal(states_c[t + 1].count, states[t + 1].count)


@SETTINGS
@given(tx=linear_transforms, c=st.floats(-100.0, 100.0), problem=problems(steps=(1, 6)))
def test_linear_transforms_commute_with_any_scaling(tx, c, problem):
    """tx(c·g) ≈ c·tx(g) for any real c, within the rounding of the state's dtype.

    Every step rounds ``c·g``, the accumulator and the output once in the leaf dtype, so the
    relative error is a few ulps per step; near-cancellations in the accumulator make it absolute,
    relative to ``|c|·max|g|``.
    """
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        out, _ = run(tx, params, grads)
        out_c, _ = run(tx, params, [scaled(g, c) for g in grads])
        eps = eps_of(problem.dtype)
        for t in range(len(grads)):
            tol = 4 * (t + 2) * eps
            # |outputs| <= (t + 2)·max|g| (trace with nesterov; ema's are <= max|g|), max|g| <= 3
            bound = 3.0 * abs(c) * (t + 2)
            assert_trees_close(out_c[t], scaled(out[t], c), rtol=tol,
                               atol=tol * bound + 1e-6 * abs(c), what=f"step {t}")


@SETTINGS
@given(dtype=dtypes, data=st.data())
def test_clip_commutes_with_positive_scaling_of_both(dtype, data):
    """clip_by_global_norm(c·m)(c·g) = c·clip_by_global_norm(m)(g) for c > 0 (positive homogeneity),
    exact for c a power of two (float32 exponent range)."""
    k = data.draw(st.integers(-6, 6))
    m = data.draw(st.floats(0.0, 5.0))
    problem = data.draw(problems(dtype="float32" if dtype == "float16" else dtype, steps=(1, 2)))
    c = 2.0 ** k
    with dtype_context(problem.dtype):
        params, grads = problem.build()
        out, _ = run(gradtx.clip_by_global_norm(m), params, grads)
        out_c, _ = run(gradtx.clip_by_global_norm(m * c), params, [scaled(g, c) for g in grads])
        for t in range(len(grads)):
            assert_trees_equal(out_c[t], scaled(out[t], c), what=f"step {t}")
    assert np.isfinite(c)
