"""gradtx.precision: master weights, stochastic rounding, dynamic loss scaling against their definitions."""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from exact_checks import same_shaped_step_computations  # noqa: E402
from gradtx import precision  # noqa: E402
from gradtx.precision import (NoMasterCopy, dynamic_loss_scale, loss_scale, master_weights,  # noqa: E402
                              stochastic_round, stochastic_rounding)


def bits_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                                      np.atleast_1d(np.asarray(y)).view(np.uint8))


def f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def grads_at(step, shapes_dtypes):
    keys = jax.random.split(jax.random.key(step), len(shapes_dtypes))
    return {name: jax.random.normal(k, shape, jnp.float32).astype(dtype)
            for k, (name, (shape, dtype)) in zip(keys, shapes_dtypes.items())}


# --------------------------------------------------------------------------------------------
# master_weights

SPEC = {"w": ((3, 4), jnp.bfloat16), "h": ((5,), jnp.float16), "b": ((4,), jnp.float32)}


def params0():
    g = grads_at(100, SPEC)
    return {k: (v.astype(jnp.float32) * 0.5).astype(v.dtype) for k, v in g.items()}


def test_master_weights_bit_exact_against_hand_written_float32_master_loop():
    inner = gradtx.adamw(1e-2, weight_decay=0.1)
    tx = master_weights(inner)
    p = params0()
    state = tx.init(p)

    # the reference: a float32 copy of the low-precision leaves, the inner optimizer run on it
    master = {k: v.astype(jnp.float32) for k, v in p.items()}
    ref_state = inner.init(master)

    @jax.jit
    def step(p, state, g):
        u, state = tx.update(g, state, p)
        return gradtx.apply_updates(p, u), state, u

    @jax.jit
    def ref_step(master, ref_state, g):
        g32 = {k: v.astype(jnp.float32) for k, v in g.items()}
        ref_u, ref_state = inner.update(g32, ref_state, master)
        return jax.tree.map(lambda m, d: m + d, master, ref_u), ref_state

    for t in range(25):
        g = grads_at(t, SPEC)
        p, state, u = step(p, state, g)
        master, ref_state = ref_step(master, ref_state, g)
        expected = {k: master[k].astype(SPEC[k][1]) for k in master}
        bits_equal(p, expected)                              # p == round(master), bit for bit
        bits_equal(state.master["w"], master["w"])
        bits_equal(state.master["h"], master["h"])
        bits_equal(state.inner_state, ref_state)
        assert u["w"].dtype == jnp.float32 and u["h"].dtype == jnp.float32
        assert u["b"].dtype == jnp.float32


def test_master_weights_keeps_updates_below_the_parameter_resolution():
    tx = master_weights(gradtx.sgd(2.0**-12))
    plain = gradtx.sgd(2.0**-12)
    p = q = jnp.ones(3, jnp.bfloat16)
    state, plain_state = tx.init(p), plain.init(q)
    g = jnp.ones(3, jnp.bfloat16)
    for _ in range(32):
        u, state = tx.update(g, state, p)
        p = gradtx.apply_updates(p, u)
        v, plain_state = plain.update(g, plain_state, q)
        q = gradtx.apply_updates(q, v)
    assert f32(q).tolist() == [1.0] * 3               # each step rounds back to 1.0
    np.testing.assert_array_equal(f32(state.master), np.full(3, 1 - 32 * 2.0**-12, np.float32))
    np.testing.assert_array_equal(f32(p), f32(jnp.asarray(state.master).astype(jnp.bfloat16)))
    assert f32(p)[0] < 1.0


@pytest.mark.parametrize("dtype, ratio", [(jnp.bfloat16, 2.0**15), (jnp.float16, 2.0**12)])
def test_emitted_update_lands_exactly_on_the_rounded_target(dtype, ratio):
    # the documented exactness condition: |target| >= |p| / ratio (or target == 0)
    rng = np.random.default_rng(0)
    n = 20_000
    hi = 60.0 if dtype == jnp.float16 else 1e6
    p = jnp.asarray(rng.uniform(-hi, hi, n) * rng.choice([1.0, 1e-3], n), jnp.float32).astype(dtype)
    factor = np.exp(rng.uniform(np.log(1 / ratio), np.log(ratio), n)) * rng.choice([-1.0, 1.0], n)
    target = (f32(p) * factor).astype(np.float32)
    target = jnp.asarray(target).astype(dtype)
    u = target.astype(jnp.float32) - p.astype(jnp.float32)
    np.testing.assert_array_equal(f32(gradtx.apply_updates(p, u)), f32(target))


def test_master_weights_no_master_copy_for_float32_leaves():
    p = params0()
    tx = master_weights(gradtx.sgd(0.1, momentum=0.9))
    state = tx.init(p)
    assert isinstance(state.master["b"], NoMasterCopy)
    assert state.master["w"].dtype == jnp.float32 and state.master["h"].dtype == jnp.float32
    master_bytes = sum(x.nbytes for x in jax.tree.leaves(state.master))
    assert master_bytes == 4 * (12 + 5)                  # only the bf16/f16 leaves are copied
    # float32-only parameters: no state beyond the inner's, updates identical to the inner's
    p32 = {"b": p["b"]}
    tx32, inner = master_weights(gradtx.adam(0.1)), gradtx.adam(0.1)
    s, r = tx32.init(p32), inner.init(p32)
    assert jax.tree.leaves(s.master) == []
    for t in range(3):
        g = {"b": grads_at(t, SPEC)["b"]}
        u, s = tx32.update(g, s, p32)
        v, r = inner.update(g, r, p32)
        bits_equal(u, v)
    bits_equal(s.inner_state, r)


def test_master_weights_abstract_init_jit_vmap_and_extra():
    p = params0()
    shapes = jax.eval_shape(master_weights(gradtx.adam(0.1)).init, p)
    assert shapes.master["w"].dtype == jnp.float32
    assert shapes.inner_state[0].mu["w"].dtype == jnp.float32   # inner moments from the master copy

    class Record(NamedTuple):
        value: jax.Array

    @gradtx.transform
    class scale_by_value(gradtx.Transform):
        def init(self, params):
            return Record(jnp.zeros((), jnp.float32))

        def update(self, updates, state, params=None, **extra):
            v = extra["value"]
            return jax.tree.map(lambda u: u * v.astype(u.dtype), updates), Record(v)

    tx = master_weights(scale_by_value())
    w = jnp.ones(2, jnp.bfloat16)
    u, s = jax.jit(tx.update)(jnp.ones(2, jnp.bfloat16), tx.init(w), w, value=jnp.float32(0.5))
    assert f32(u).tolist() == [0.5, 0.5] and float(s.inner_state.value) == 0.5

    batched_w = jnp.stack([w, 2 * w])
    states = jax.vmap(tx.init)(batched_w)
    us, _ = jax.vmap(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))(
        batched_w, states, batched_w)
    assert f32(us).tolist() == [[1.0, 1.0], [2.0, 2.0]]


def test_master_weights_errors_and_repr():
    with pytest.raises(ValueError, match="master_dtype"):
        master_weights(gradtx.sgd(0.1), master_dtype="bfloat16")
    with pytest.raises(TypeError, match="inner"):
        master_weights(3)
    tx = master_weights(gradtx.scale(2.0))
    assert repr(tx) == "master_weights(inner=scale(factor=2.0))"
    assert tx == master_weights(gradtx.scale(2.0)) and hash(tx) == hash(master_weights(gradtx.scale(2.0)))
    w = {"a": jnp.ones(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(w, tx.init(w))
    with pytest.raises(gradtx.TreeMismatchError, match="master_weights"):
        tx.update({"b": w["a"]}, tx.init(w), {"b": w["a"]})


# --------------------------------------------------------------------------------------------
# stochastic_round


def neighbours(x, dtype):
    """The two neighbours ``lo <= x <= hi`` of each float32 ``x`` among all finite values of
    ``dtype`` (every bit pattern enumerated: independent of the implementation's bit stepping)."""
    width = jnp.finfo(dtype).bits
    patterns = np.arange(2 ** width, dtype={8: np.uint8, 16: np.uint16}[width])
    values = np.unique(patterns.view(dtype).astype(np.float32))
    values = values[np.isfinite(values)]
    x = f32(x)
    hi = values[np.searchsorted(values, x, side="left")]
    lo = values[np.searchsorted(values, x, side="right") - 1]
    return lo, hi


@pytest.mark.parametrize("dtype, scale", [
    (jnp.bfloat16, 1.0), (jnp.bfloat16, 1e-30), (jnp.float16, 1.0), (jnp.float16, 1e-6),
    (jnp.float8_e4m3fn, 1.0), (jnp.float8_e4m3fn, 2.0**-7), (jnp.float8_e5m2, 1.0),
    (jnp.float8_e4m3fnuz, 2.0**-8), (jnp.float8_e5m2fnuz, 1.0)])
def test_stochastic_round_is_unbiased(dtype, scale):
    # the small scales exercise subnormal ranges (float16 spacing 2**-24; float8_e4m3fn 2**-9)
    # and, for the *fnuz formats (no negative zero), steps across zero
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-3, 3, 48) * scale, jnp.float32)
    copies = 4096
    y = stochastic_round(jnp.broadcast_to(x, (copies, 48)), jax.random.key(3), dtype)
    assert y.dtype == dtype
    lo, hi = neighbours(x, dtype)
    yf = f32(y)
    assert np.all((yf == lo) | (yf == hi))                 # always one of the two neighbours
    gap = np.where(hi > lo, hi - lo, 1.0)
    # each draw has std <= gap/2: the mean of 4096 draws is within gap * 6/(2*64) (6 sigma)
    err = np.abs(yf.mean(axis=0, dtype=np.float64) - f32(x))
    assert np.all(err <= 0.047 * gap), (err / gap).max()
    # and it is not round-to-nearest in disguise: the fraction of "up" draws tracks the position
    frac_up = np.where(hi > lo, (yf == hi).mean(axis=0), 0.0)
    pos = np.where(hi > lo, (f32(x) - lo) / gap, 0.0)
    np.testing.assert_allclose(frac_up, pos, atol=0.05)


def test_stochastic_round_rejects_formats_without_sign_or_byte():
    for dtype in (jnp.float4_e2m1fn, jnp.float8_e8m0fnu):
        with pytest.raises(TypeError, match=rf"dtype={jnp.dtype(dtype).name} is not supported"):
            stochastic_round(jnp.ones(4), jax.random.key(0), dtype)


def test_stochastic_round_special_values_and_keys():
    x = jnp.asarray([1.0, -0.0, 0.5, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        y = f32(stochastic_round(x, jax.random.key(0), dtype))
        np.testing.assert_array_equal(y[:5], f32(x.astype(dtype))[:5])
        assert np.isnan(y[5]) and np.signbit(y[1])
    # beyond the finite range: as round-to-nearest (float16 overflows to inf)
    big = jnp.asarray([1e5, -1e5, 3.0e38], jnp.float32)
    assert f32(stochastic_round(big[:2], jax.random.key(0), jnp.float16)).tolist() == [
        np.inf, -np.inf]
    y = f32(stochastic_round(jnp.broadcast_to(big[2], (64,)), jax.random.key(0), jnp.bfloat16))
    assert np.all(np.isfinite(y))
    x = jnp.full(256, 1.0 + 2.0**-9, jnp.float32)
    a = stochastic_round(x, jax.random.key(0), jnp.bfloat16)
    b = stochastic_round(x, jax.random.key(0), jnp.bfloat16)
    c = stochastic_round(x, jax.random.key(1), jnp.bfloat16)
    bits_equal(a, b)
    assert not np.array_equal(f32(a), f32(c))
    raw = jax.random.key_data(jax.random.key(0))
    bits_equal(stochastic_round(x, raw, jnp.bfloat16), a)
    # rounding to a dtype at least as wide is a plain cast
    bits_equal(stochastic_round(x, raw, jnp.float32), x)


# --------------------------------------------------------------------------------------------
# stochastic_rounding


def test_stochastic_rounding_applies_small_updates_in_expectation():
    n, steps, lr = 8192, 64, 2.0**-12
    tx = gradtx.chain(gradtx.sgd(lr), stochastic_rounding(seed=7))
    plain = gradtx.sgd(lr)
    p = q = jnp.ones(n, jnp.bfloat16)
    g = jnp.ones(n, jnp.bfloat16)
    state, plain_state = tx.init(p), plain.init(q)

    @jax.jit
    def step(p, state):
        u, state = tx.update(g, state, p)
        return gradtx.apply_updates(p, u), state, u

    for _ in range(steps):
        p, state, u = step(p, state)
        v, plain_state = plain.update(g, plain_state, q)
        q = gradtx.apply_updates(q, v)
    assert u.dtype == jnp.float32 and p.dtype == jnp.bfloat16
    assert np.all(f32(q) == 1.0)                           # round-to-nearest loses every step
    expected = 1.0 - steps * lr                            # 0.984375
    # per-element noise stays below one bf16 ulp (2**-8) per step: the mean over 8192 is tight
    assert abs(f32(p).mean(dtype=np.float64) - expected) < 2e-4
    assert f32(p).std() > 0                                # the elements did not move in lock-step


def test_stochastic_rounding_state_leaves_and_exact_landing():
    tx = stochastic_rounding()
    p = {"w": jnp.ones(512, jnp.bfloat16), "b": jnp.ones(4, jnp.float32),
         "h": jnp.ones(512, jnp.float16)}
    u = {"w": jnp.full(512, 2.0**-10, jnp.float32), "b": jnp.full(4, 1e-3, jnp.float32),
         "h": jnp.full(512, 2.0**-13, jnp.float32)}
    state = tx.init(p)
    out, state2 = tx.update(u, state, p)
    bits_equal(out["b"], u["b"])                           # float32 leaves pass through
    new = gradtx.apply_updates(p, out)
    for k, ulp in (("w", 2.0**-7), ("h", 2.0**-10)):
        vals = set(f32(new[k]).tolist())
        assert vals == {1.0, 1.0 + ulp}                    # lands exactly on a neighbour
    assert not np.array_equal(np.asarray(state.key), np.asarray(state2.key))
    out2, _ = tx.update(u, state2, p)
    assert not np.array_equal(f32(out["w"]), f32(out2["w"]))   # a fresh key every step
    with pytest.raises(ValueError, match="seed"):
        stochastic_rounding(seed=-1)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(u, state)
    assert repr(stochastic_rounding(seed=3)) == "stochastic_rounding(seed=3)"


def test_stochastic_rounding_streams_live_in_the_state_and_drive_the_draws():
    """``init`` numbers each bf16/f16 parameter's random stream by its position among the
    parameters' leaves; ``update`` keeps the numbers, and a parameter's draws follow its number."""
    x = jnp.full(2048, 1.0, jnp.bfloat16)
    p = {"a": x, "b": jnp.ones(3, jnp.float32), "c": x, "d": jnp.ones(8, jnp.float16)}
    tx = stochastic_rounding(seed=5)
    state = tx.init(p)
    assert [int(s) for s in state.streams] == [0, 2, 3]           # float32 "b" has none
    assert all(s.dtype == jnp.uint32 and s.shape == () for s in state.streams)
    u = {"a": jnp.full(2048, 2.0**-10), "b": jnp.zeros(3), "c": jnp.full(2048, 2.0**-10),
         "d": jnp.full(8, 2.0**-13)}
    step = jax.jit(tx.update)
    out, new = step(u, state, p)
    assert [int(s) for s in new.streams] == [0, 2, 3]
    assert not np.array_equal(f32(out["a"]), f32(out["c"]))     # equal inputs, own draws
    swapped = state._replace(streams=(state.streams[1], state.streams[0], state.streams[2]))
    out_swapped, _ = step(u, swapped, p)
    bits_equal(out_swapped["a"], out["c"])
    bits_equal(out_swapped["c"], out["a"])
    for bad, held in ((state.streams[:2], "2 stream numbers"), ((), "0 stream numbers")):
        with pytest.raises(gradtx.TreeMismatchError,
                           match=rf"state.streams holds {held} for 3 bfloat16/float16 parameters"):
            tx.update(u, state._replace(streams=bad), p)


def test_stochastic_rounding_compiles_same_shaped_leaves_to_shared_loops():
    """The stream number is a buffer of the state: same-shaped parameters share their rounding
    loop (XLA compiles each distinct loop separately; with the leaf's position compiled in, and
    Threefry per element, 200 bf16 leaves of 64x64 took ~20 s to compile, now ~5 s)."""
    tx = gradtx.chain(gradtx.adamw(1e-3), stochastic_rounding())
    assert same_shaped_step_computations(tx, 2, (16, 24), jnp.bfloat16) == \
        same_shaped_step_computations(tx, 5, (16, 24), jnp.bfloat16)


def test_stochastic_round_draws_threefry_once_per_call_not_per_element():
    """The random bits are a counter-based hash (gradtx.counter_random): Threefry runs once, for
    two words, whatever the array's size."""
    jaxpr = jax.make_jaxpr(lambda x, k: stochastic_round(x, k, jnp.bfloat16))(
        jnp.ones((64, 96)), jax.random.key(0))
    draws = [e for e in jaxpr.eqns if e.primitive.name == "random_bits"]
    assert [tuple(e.params["shape"]) for e in draws] == [(2,)]


# --------------------------------------------------------------------------------------------
# dynamic_loss_scale


def test_overflow_step_is_skipped_state_bit_identical_scale_halved():
    tx = dynamic_loss_scale(gradtx.adam(0.1), initial_scale=2.0**10, growth_interval=4)
    p = {"w": jnp.ones(3, jnp.float32), "v": jnp.ones(2, jnp.float16)}
    state = tx.init(p)
    step = jax.jit(tx.update)
    for t in range(2):
        _, state = step({"w": jnp.full(3, 8.0), "v": jnp.full(2, 4.0, jnp.float16)}, state, p)
    assert int(state.good_steps) == 2
    for bad in (jnp.inf, jnp.nan):
        g = {"w": jnp.array([1.0, bad, 2.0]), "v": jnp.full(2, 4.0, jnp.float16)}
        before = state
        u, state = step(g, state, p)
        bits_equal(state.inner_state, before.inner_state)
        assert bool(state.skipped) and int(state.good_steps) == 0
        assert float(state.loss_scale) == float(before.loss_scale) / 2
        assert all(np.all(f32(x) == 0) for x in jax.tree.leaves(u))
        assert u["v"].dtype == jnp.float32                  # unscaled grads are float32
    # an overflowing float16 gradient (inf in the half-precision leaf only) is caught too
    g = {"w": jnp.ones(3), "v": jnp.array([jnp.inf, 1.0], jnp.float16)}
    _, state = step(g, state, p)
    assert bool(state.skipped) and float(state.loss_scale) == 2.0**7


def test_scale_grows_after_interval_and_respects_min_scale():
    tx = dynamic_loss_scale(gradtx.sgd(0.1), initial_scale=4.0, growth_interval=3,
                            growth_factor=4.0, backoff_factor=0.25, min_scale=2.0)
    state = tx.init(jnp.zeros(2))
    scales = []
    for g in [1.0, 1.0, 1.0, 1.0, 1.0, jnp.inf, jnp.inf, 1.0, 1.0, 1.0]:
        _, state = tx.update(jnp.full(2, g), state)
        scales.append(float(state.loss_scale))
    assert scales == [4.0, 4.0, 16.0, 16.0, 16.0, 4.0, 2.0, 2.0, 2.0, 8.0]
    # growth that would overflow float32 keeps the scale
    tx = dynamic_loss_scale(gradtx.sgd(0.1), initial_scale=2.0**127, growth_interval=1)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    assert float(state.loss_scale) == 2.0**127


def test_equals_inner_on_unscaled_grads_when_no_overflow():
    inner = gradtx.adamw(1e-2, weight_decay=0.1)
    tx = dynamic_loss_scale(inner, initial_scale=2.0**12, growth_interval=3)
    p = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)}
    state, ref = tx.init(p), inner.init(p)
    step, ref_step = jax.jit(tx.update), jax.jit(inner.update)
    skipped_at = 5
    for t in range(10):
        g = grads_at(t, {"w": ((2, 3), jnp.float32)})
        s = loss_scale(state)
        scaled = jax.tree.map(lambda x: x * s, g)
        if t == skipped_at:
            scaled = {"w": scaled["w"].at[0, 0].set(jnp.inf)}
        u, state = step(scaled, state, p)
        if t == skipped_at:
            assert bool(state.skipped)
            continue
        v, ref = ref_step(g, ref, p)
        bits_equal(u, v)
        p = gradtx.apply_updates(p, u)
    bits_equal(state.inner_state, ref)
    # 5 finite steps then an overflow then 4 finite: grew at t=2 (2**13), t=5 halves, grows at t=8
    assert float(state.loss_scale) == 2.0**13


def test_float16_training_underflows_or_overflows_without_dynamic_scaling_and_trains_with_it():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float16)
    y = x @ jnp.asarray([1.0, -2.0, 0.5, 3.0], jnp.float16)

    def loss16(w):     # a float16 loss as small as such losses often are
        r = x @ w - y
        return jnp.mean(r * r) * jnp.float16(2.0**-20)

    def loss32(w):
        r = (x @ w - y).astype(jnp.float32)
        return float(jnp.mean(r * r))

    opt = gradtx.sgd(2.0**18)     # = 0.25 on the unshrunk mean squared error

    def run(tx, scale_of):
        w = jnp.zeros(4, jnp.float16)
        state = tx.init(w)

        @jax.jit
        def step(w, state):
            s = scale_of(state)
            g = jax.grad(lambda w: loss16(w).astype(jnp.float32) * s)(w)
            u, state = tx.update(g, state, w)
            return gradtx.apply_updates(w, u), state, g

        for _ in range(60):
            w, state, g = step(w, state)
        return w, state, g

    start = loss32(jnp.zeros(4, jnp.float16))
    w, _, g = run(opt, lambda s: jnp.float32(1.0))                   # no scaling: underflow
    assert np.all(f32(g) == 0) and loss32(w) == start
    fixed = gradtx.chain(gradtx.scale(2.0**-24), opt)                   # a static scale too large
    w, _, _ = run(fixed, lambda s: jnp.float32(2.0**24))
    assert np.all(np.isnan(f32(w)))
    tx = dynamic_loss_scale(opt, initial_scale=2.0**24, growth_interval=10)
    w, state, _ = run(tx, loss_scale)
    assert loss32(w) < 1e-4 * start
    assert float(state.loss_scale) < 2.0**24 and np.all(np.isfinite(f32(w)))


def test_dynamic_loss_scale_vmap_loss_scale_helper_and_validation():
    tx = dynamic_loss_scale(gradtx.sgd(1.0), initial_scale=8.0)
    states = jax.vmap(tx.init)(jnp.zeros((2, 3)))
    g = jnp.stack([jnp.full(3, 8.0), jnp.array([8.0, jnp.inf, 8.0])])
    u, states = jax.vmap(tx.update)(g, states)
    assert f32(u).tolist() == [[-1.0] * 3, [0.0] * 3]
    assert f32(states.loss_scale).tolist() == [8.0, 4.0]
    assert np.asarray(states.skipped).tolist() == [False, True]

    chained = gradtx.chain(gradtx.scale(1.0), tx)
    assert float(loss_scale(chained.init(jnp.zeros(1)))) == 8.0
    with pytest.raises(ValueError, match="no dynamic_loss_scale"):
        loss_scale(gradtx.sgd(0.1).init(jnp.zeros(1)))
    with pytest.raises(ValueError, match="2 dynamic_loss_scale"):
        loss_scale((tx.init(jnp.zeros(1)), tx.init(jnp.zeros(1))))
    with pytest.raises(ValueError, match="min_scale"):
        dynamic_loss_scale(gradtx.sgd(0.1), initial_scale=1.0, min_scale=2.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        dynamic_loss_scale(gradtx.sgd(0.1), backoff_factor=0.0)
    with pytest.raises(ValueError, match="growth_factor"):
        dynamic_loss_scale(gradtx.sgd(0.1), growth_factor=0.5)
    assert repr(dynamic_loss_scale(gradtx.scale(1.0), growth_interval=10)) == \
        "dynamic_loss_scale(inner=scale(factor=1.0), growth_interval=10)"


def test_composes_with_master_weights_for_float16_params():
    inner = gradtx.adam(1e-2)
    tx = dynamic_loss_scale(master_weights(inner), initial_scale=2.0**8)
    p = {"w": jnp.ones(4, jnp.float16)}
    state = tx.init(p)
    master = {"w": jnp.ones(4, jnp.float32)}
    ref = inner.init(master)
    for t in range(5):
        g = grads_at(t, {"w": ((4,), jnp.float32)})
        scaled = {"w": (g["w"] * loss_scale(state)).astype(jnp.float16)}
        u, state = tx.update(scaled, state, p)
        p = gradtx.apply_updates(p, u)
        g16 = {"w": scaled["w"].astype(jnp.float32) / jnp.float32(2.0**8)}
        v, ref = inner.update(g16, ref, master)
        master = {"w": master["w"] + v["w"]}
        bits_equal(p, {"w": master["w"].astype(jnp.float16)})
    assert precision.__all__ and all(hasattr(precision, n) for n in precision.__all__)
