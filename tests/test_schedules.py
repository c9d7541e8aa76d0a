"""gradtx.schedules: closed forms (numpy float64 references), boundaries, continuity,
monotonicity, jit/vmap, use as a learning rate, value semantics and validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import schedules as S

T = np.arange(0, 400)


def ref_linear(t, a, b, n, begin=0):
    f = np.clip((t - begin) / n, 0, 1)
    return a + (b - a) * f


def ref_cos(t, a, b, n, e=1.0):
    return b + (a - b) * (0.5 * (1 + np.cos(np.pi * np.minimum(t, n) / n))) ** e


def warm(t, init, peak, w):
    return init + (peak - init) * t / max(w, 1)


def ref_warmup_cosine(t, peak, w, d, init, end, e=1.0):
    return np.where(t < w, warm(t, init, peak, w), ref_cos(t - w, peak, end, d, e))


def ref_wsd(t, peak, w, s, d, init, end, shape):
    f = np.clip((t - w - s) / d, 0, 1)
    g = {"linear": 1 - f, "cosine": 0.5 * (1 + np.cos(np.pi * f)), "sqrt": 1 - np.sqrt(f)}[shape]
    return np.where(t < w, warm(t, init, peak, w), end + (peak - end) * g)


def ref_one_cycle(t, peak, total, pct, div, fdiv, anneal, three):
    init, final = peak / div, peak / div / fdiv
    e1, e2 = pct * total - 1, 2 * pct * total - 2
    phases = ([(e1, init, peak), (e2, peak, init), (total - 1, init, final)] if three
              else [(e1, init, peak), (total - 1, peak, final)])
    out = []
    for s in np.minimum(t, total - 1):
        start = 0.0
        for i, (end, a, b) in enumerate(phases):
            if s <= end or i == len(phases) - 1:
                f = (s - start) / (end - start)
                out.append(b + (a - b) * 0.5 * (1 + math.cos(math.pi * f)) if anneal == "cos"
                           else a + (b - a) * f)
                break
            start = end
    return np.asarray(out)


def ref_cyclic(t, base, mx, up, down, mode, gamma):
    size = up + down
    r = t % size
    h = np.where(r <= up, r / up, (size - r) / max(down, 1))
    amp = {"triangular": np.ones_like(t, float), "triangular2": 0.5 ** (t // size),
           "exp_range": gamma ** t.astype(float)}[mode]
    return base + (mx - base) * h * amp


def ref_sgdr(t, peak, t0, mult, lo):
    out = []
    for s in t:
        start, period = 0, t0
        while s >= start + period:
            start, period = start + period, period * mult
        out.append(lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (s - start) / period)))
    return np.asarray(out)


CASES = [
    (S.constant(0.3), lambda t: np.full(t.shape, 0.3)),
    (S.linear(1.0, 0.1, 50, transition_begin=20), lambda t: ref_linear(t, 1.0, 0.1, 50, 20)),
    (S.linear(0.0, 2.0, 7), lambda t: ref_linear(t, 0.0, 2.0, 7)),
    (S.polynomial(1.0, 0.01, 2.5, 100, 10),
     lambda t: 0.01 + 0.99 * (1 - np.clip((t - 10) / 100, 0, 1)) ** 2.5),
    (S.polynomial(0.0, 1.0, 0.5, 30), lambda t: 1.0 - (1 - np.clip(t / 30, 0, 1)) ** 0.5),
    (S.exponential(2.0, 0.97, 3, 5), lambda t: 2.0 * 0.97 ** (np.maximum(t - 5, 0) / 3)),
    (S.exponential(2.0, 0.5, 10, staircase=True, end_value=0.1),
     lambda t: np.maximum(2.0 * 0.5 ** (t // 10), 0.1)),
    (S.exponential(0.1, 1.01, end_value=0.2), lambda t: np.minimum(0.1 * 1.01 ** t, 0.2)),
    (S.piecewise_constant((1.0, 0.3, 0.02), (0 + 17, 200)),
     lambda t: np.where(t < 17, 1.0, np.where(t < 200, 0.3, 0.02))),
    (S.step_decay(0.8, 30, 0.7), lambda t: 0.8 * 0.7 ** (t // 30)),
    (S.multistep(0.8, (10, 10, 150)), lambda t: 0.8 * 0.1 ** ((t >= 10) * 2 + (t >= 150))),
    (S.cosine(1.0, 123, 0.05), lambda t: ref_cos(t, 1.0, 0.05, 123)),
    (S.cosine(1.0, 90, 0.0, exponent=2.0), lambda t: ref_cos(t, 1.0, 0.0, 90, 2.0)),
    (S.cosine(0.5, 60, 0.1, periodic=True),
     lambda t: 0.1 + 0.4 * 0.5 * (1 + np.cos(np.pi * t / 60))),
    (S.warmup_cosine(1.0, 25, 300, init_value=0.1, end_value=0.01),
     lambda t: ref_warmup_cosine(t, 1.0, 25, 300, 0.1, 0.01)),
    (S.warmup_cosine(1.0, 0, 100), lambda t: ref_warmup_cosine(t, 1.0, 0, 100, 0.0, 0.0)),
    (S.warmup_linear(2.0, 40, 200, end_value=0.2),
     lambda t: np.where(t < 40, warm(t, 0.0, 2.0, 40), ref_linear(t - 40, 2.0, 0.2, 200))),
    (S.inverse_sqrt(1.0, 16), lambda t: np.where(t < 16, t / 16, np.sqrt(16 / np.maximum(t, 1)))),
    (S.inverse_sqrt(1.0, 0, timescale=4.0), lambda t: 1 / np.sqrt(1 + t / 4)),
    *[(S.warmup_stable_decay(1.0, 20, 100, 150, 0.0, 0.05, shape),
       (lambda shape: lambda t: ref_wsd(t, 1.0, 20, 100, 150, 0.0, 0.05, shape))(shape))
      for shape in ("linear", "cosine", "sqrt")],
    *[(S.one_cycle(1.0, 300, pct, 25.0, 1e4, anneal, three),
       (lambda pct, anneal, three: lambda t: ref_one_cycle(t, 1.0, 300, pct, 25.0, 1e4, anneal,
                                                            three))(pct, anneal, three))
      for pct in (0.3, 0.257) for anneal in ("cos", "linear") for three in (False, True)],
    *[(S.cyclic(0.1, 1.0, 23, down, mode, 0.995),
       (lambda down, mode: lambda t: ref_cyclic(t, 0.1, 1.0, 23, 23 if down is None else down,
                                                mode, 0.995))(down, mode))
      for down in (None, 40) for mode in ("triangular", "triangular2", "exp_range")],
    (S.sgdr(1.0, 13, 1, 0.01), lambda t: ref_sgdr(t, 1.0, 13, 1, 0.01)),
    (S.sgdr(1.0, 7, 3, 0.0), lambda t: ref_sgdr(t, 1.0, 7, 3, 0.0)),
    (S.join((S.linear(0.0, 1.0, 10), S.constant(1.0), S.cosine(1.0, 50)), (10, 60)),
     lambda t: np.where(t < 10, t / 10, np.where(t < 60, 1.0, ref_cos(t - 60, 1.0, 0.0, 50)))),
]
IDS = [repr(s)[:60] for s, _ in CASES]


@pytest.mark.parametrize("schedule,ref", CASES, ids=IDS)
def test_closed_form_and_jit(schedule, ref):
    got = np.asarray(schedule(jnp.asarray(T, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == T.shape
    expected = ref(T).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    # jit == eager and Python-int steps == array steps, exactly
    jitted = jax.jit(schedule)
    for t in (0, 1, 17, 199, 399):
        assert float(jitted(jnp.int32(t))) == float(schedule(t)) == got[t]


EXACT_BOUNDARIES = [
    (S.linear(1.0, 0.25, 8, 4), {0: 1.0, 4: 1.0, 8: 0.625, 12: 0.25, 1000: 0.25}),
    (S.warmup_cosine(2.0, 10, 20, init_value=0.5, end_value=0.25),
     {0: 0.5, 10: 2.0, 30: 0.25, 31: 0.25, 10 ** 6: 0.25}),
    (S.warmup_linear(1.0, 4, 4), {0: 0.0, 2: 0.5, 4: 1.0, 6: 0.5, 8: 0.0, 9: 0.0}),
    (S.warmup_stable_decay(1.0, 4, 3, 4, 0.5, 0.25, "sqrt"), {0: 0.5, 4: 1.0, 7: 1.0, 11: 0.25}),
    (S.step_decay(1.0, 3, 0.5), {2: 1.0, 3: 0.5, 5: 0.5, 6: 0.25}),
    (S.multistep(1.0, (3, 5), 0.5), {2: 1.0, 3: 0.5, 4: 0.5, 5: 0.25}),
    (S.piecewise_constant((3.0, 2.0), (5,)), {4: 3.0, 5: 2.0}),
    (S.cosine(1.0, 10, 0.5), {0: 1.0, 10: 0.5, 11: 0.5}),
    (S.one_cycle(1.0, 100, 0.3, 4.0, 2.0), {0: 0.25, 99: 0.125, 500: 0.125}),
    (S.sgdr(1.0, 5, 2), {0: 1.0, 5: 1.0, 15: 1.0, 35: 1.0}),
    (S.cyclic(0.5, 1.0, 4, 2), {0: 0.5, 4: 1.0, 6: 0.5, 10: 1.0}),
    (S.inverse_sqrt(2.0, 4), {0: 0.0, 4: 2.0, 16: 1.0, 64: 0.5}),
    (S.exponential(1.0, 0.5, 2, 3), {0: 1.0, 3: 1.0, 5: 0.5, 7: 0.25}),
    (S.polynomial(1.0, 0.5, 2.0, 4), {0: 1.0, 2: 0.625, 4: 0.5, 9: 0.5}),
]


@pytest.mark.parametrize("schedule,points", EXACT_BOUNDARIES, ids=[repr(s) for s, _ in
                                                                     EXACT_BOUNDARIES])
def test_exact_at_boundaries(schedule, points):
    for t, v in points.items():
        assert float(schedule(t)) == v, (t, float(schedule(t)), v)


CONTINUOUS = [S.linear(1.0, 0.0, 50, 10), S.polynomial(1.0, 0.0, 3.0, 60),
              S.exponential(1.0, 0.9, 7), S.cosine(1.0, 80), S.cosine(1.0, 80, periodic=True),
              S.warmup_cosine(1.0, 20, 100), S.warmup_linear(1.0, 20, 100),
              S.inverse_sqrt(1.0, 20), S.warmup_stable_decay(1.0, 20, 30, 50, decay_shape="cosine"),
              S.one_cycle(1.0, 200), S.one_cycle(1.0, 200, three_phase=True),
              S.cyclic(0.0, 1.0, 20)]


@pytest.mark.parametrize("schedule", CONTINUOUS, ids=repr)
def test_continuous(schedule):
    # no jump larger than the steepest slope of the closed form allows (≈ 1/phase length)
    v = np.asarray(schedule(jnp.arange(300)), np.float64)
    assert np.max(np.abs(np.diff(v))) < 0.06


MONOTONE = [  # (schedule, start, stop, direction) on one phase
    (S.warmup_cosine(1.0, 37, 211), 0, 37, 1), (S.warmup_cosine(1.0, 37, 211), 37, 260, -1),
    (S.polynomial(1.0, 0.0, 0.7, 90), 0, 120, -1), (S.exponential(1.0, 0.99), 0, 400, -1),
    (S.inverse_sqrt(1.0, 30), 30, 400, -1), (S.one_cycle(1.0, 333), 0, 99, 1),
    (S.one_cycle(1.0, 333), 99, 332, -1), (S.sgdr(1.0, 100), 0, 99, -1),
    (S.warmup_stable_decay(1.0, 10, 10, 200, decay_shape="sqrt"), 20, 220, -1),
]


@pytest.mark.parametrize("schedule,a,b,sign", MONOTONE, ids=[repr(m[0]) for m in MONOTONE])
def test_monotone_phases(schedule, a, b, sign):
    v = np.asarray(schedule(jnp.arange(a, b + 1)), np.float64)
    assert np.all(sign * np.diff(v) >= 0)


def test_float32_accuracy_on_long_runs():
    # near the end of a long cosine the value is tiny; the half-angle form keeps it accurate
    s = S.cosine(1.0, 100_000)
    t = np.array([1, 50_000, 99_000, 99_990, 99_999])
    np.testing.assert_allclose(np.asarray(s(t)), ref_cos(t, 1.0, 0.0, 100_000), rtol=1e-6)
    e = S.exponential(1.0, 0.99999)
    t = np.array([10, 100_000, 1_000_000])
    np.testing.assert_allclose(np.asarray(e(t)), 0.99999 ** t, rtol=3e-6)


def test_x64_evaluates_in_float64_returns_float32():
    s = S.cosine(1.0, 1000, 1e-3)
    with jax.enable_x64(True):
        v = s(999)
        assert v.dtype == jnp.float32
        assert float(v) == float(np.float32(ref_cos(np.float64(999), 1.0, 1e-3, 1000)))


def test_traced_vmapped_negative_and_large_steps():
    s = S.warmup_cosine(1.0, 10, 90)
    steps = jnp.arange(-3, 120)
    v = jax.vmap(s)(steps)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(s(steps)))
    assert float(s(-5)) == float(s(0)) == 0.0
    assert float(s(2 ** 31 - 1)) == 0.0
    assert float(S.sgdr(1.0, 3, 2)(2 ** 31 - 1)) >= 0.0
    assert np.isfinite(float(S.cyclic(0.1, 1.0, 2 ** 30, mode="triangular2")(2 ** 31 - 1)))
    assert float(jax.jit(lambda t: s(t) * 2)(jnp.int32(10))) == 2.0


def test_usable_as_learning_rate():
    s = S.warmup_linear(1.0, 2, 2)
    tx = gradtx.scale_by_learning_rate(s)
    state = tx.init(jnp.zeros(1))
    step = jax.jit(tx.update)
    got = []
    for _ in range(5):
        u, state = step(jnp.ones(1), state)
        got.append(u.tolist()[0])
    assert got == [-0.0, -0.5, -1.0, -0.5, -0.0]
    # equal schedules make equal transforms (same jit cache entry)
    assert tx == gradtx.scale_by_learning_rate(S.warmup_linear(1.0, 2, 2))


def test_value_semantics_and_repr():
    a = S.join((S.linear(0.0, 1.0, 5), S.cosine(1.0, 10)), (5,))
    b = S.join([S.linear(0.0, 1.0, 5), S.cosine(1.0, 10)], [5])
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != S.join((S.linear(0.0, 1.0, 5), S.cosine(1.0, 11)), (5,))
    assert repr(a) == ("join(schedules=(linear(init_value=0.0, end_value=1.0, transition_steps=5), "
                       "cosine(init_value=1.0, decay_steps=10)), boundaries=(5,))")
    assert repr(S.warmup_cosine(1.0, 5, 10, end_value=0.1)) == (
        "warmup_cosine(peak_value=1.0, warmup_steps=5, decay_steps_after_warmup=10, end_value=0.1)")
    with pytest.raises(dataclasses_frozen_error()):
        a.boundaries = (6,)
    assert eval(repr(S.cyclic(0.1, 1.0, 4, mode="exp_range", gamma=0.5)),
                {k: getattr(S, k) for k in S.__all__}) == S.cyclic(0.1, 1.0, 4, mode="exp_range",
                                                                   gamma=0.5)


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("build,match", [
    (lambda: S.linear(1.0, 0.0, 0), r"linear: transition_steps=0 is out of range; expected 1 <="),
    (lambda: S.cosine(1.0, -3), "decay_steps=-3"),
    (lambda: S.cosine(float("nan"), 3), "init_value=nan is not finite"),
    (lambda: S.warmup_cosine(1.0, 10, 0), "decay_steps_after_warmup=0"),
    (lambda: S.exponential(1.0, 0.0), "decay_rate=0.0"),
    (lambda: S.exponential(1.0, 0.5, end_value=2.0), "end_value=2.0 is above init_value"),
    (lambda: S.exponential(1.0, 1.5), "decay_rate=1.5 > 1 grows without bound"),
    (lambda: S.piecewise_constant((1.0, 2.0), (3, 4)), "len\\(values\\) == len\\(boundaries\\) \\+ 1"),
    (lambda: S.piecewise_constant((1.0, 2.0, 3.0), (4, 4)), "strictly increasing"),
    (lambda: S.multistep(1.0, (5, 3)), "non-decreasing"),
    (lambda: S.one_cycle(1.0, 100, pct_start=1.5), "pct_start=1.5"),
    (lambda: S.one_cycle(1.0, 100, anneal="cosine"), "anneal='cosine' is not one of"),
    (lambda: S.cyclic(0.1, 1.0, 0), "step_size_up=0"),
    (lambda: S.cyclic(0.1, 1.0, 4, mode="tri"), "mode='tri'"),
    (lambda: S.sgdr(1.0, 0), "first_period=0"),
    (lambda: S.sgdr(1.0, 10, 0), "period_mult=0"),
    (lambda: S.join((S.constant(1.0), S.constant(2.0)), (0,)), "boundaries\\[0\\]=0"),
    (lambda: S.join((S.constant(1.0), S.constant(2.0)), ()), "len\\(boundaries\\)"),
    (lambda: S.join((S.constant(1.0), 3.0), (2,)), "schedules\\[1\\]=3.0 is not a schedule"),
    (lambda: S.warmup_stable_decay(1.0, 1, 1, 1, decay_shape="exp"), "decay_shape"),
    (lambda: S.polynomial(1.0, 0.0, 0.0, 10), "power=0.0"),
])
def test_invalid_arguments_raise_naming_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_bool_and_float_step_counts_rejected():
    with pytest.raises(TypeError, match="warmup_steps=True is a bool"):
        S.warmup_cosine(1.0, True, 10)
    with pytest.raises(TypeError, match="decay_steps=2.5 is not an integer"):
        S.cosine(1.0, 2.5)


def test_not_reexported_flat():
    assert not hasattr(gradtx, "warmup_cosine") and not hasattr(gradtx, "one_cycle")
