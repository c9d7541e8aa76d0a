"""Tests of the float8 code map of gradtx.quantization (``code_map="float8"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.counter_random import key_words, random_bits
from gradtx.quantization import (QuantizedArray, _float8_codes,
                                 dequantize_blockwise, float8_map, quantize_blockwise,
                                 quantized_state)
from test_quantization import _params, _problem, _train, dequantized  # noqa: E402

_BASE = {True: 889, False: 761}          # magnitude code c >= 1 is the float32 (c + base) << 20
_TOP = {True: 127, False: 255}


def _magnitudes(signed):
    return float8_map(signed)[:_TOP[signed] + 1].astype(np.float64)


def _reference_nearest(y, signed):
    """Nearest magnitude code by brute force in float64; ties to the even key ``c + base``, the
    tie between 0 and the smallest value to 0. Then the sign bit (non-zero codes only)."""
    mags = _magnitudes(signed)
    a = np.abs(y.astype(np.float64)) if signed else np.maximum(y.astype(np.float64), 0.0)
    hi = np.clip(np.searchsorted(mags, a), 1, len(mags) - 1)
    lo = hi - 1
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    tie_to_hi = (d_lo == d_hi) & (lo > 0) & ((lo + _BASE[signed]) % 2 == 1)
    code = np.where((d_hi < d_lo) | tie_to_hi, hi, lo)
    if signed:
        code = np.where((code > 0) & (np.signbit(y)), code | 0x80, code)
    return code.astype(np.uint8)


def _edge_values(signed):
    """Every map value, every midpoint between neighbours, and their float32 neighbours."""
    mags = _magnitudes(signed)
    mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)   # exact: a float32 midpoint
    vals = mags.astype(np.float32)
    out = [vals, mids]
    for x in (vals, mids):
        out += [np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(2))]
    out = np.concatenate(out)
    out = out[out <= 1]
    return np.concatenate([out, -out]) if signed else np.concatenate([out, -out[:50]])


# --------------------------------------------------------------------------------------------
# the map


@pytest.mark.parametrize("signed", [True, False])
def test_map_is_a_float_with_three_mantissa_bits(signed):
    m = float8_map(signed)
    assert m.shape == (256,) and m.dtype == np.float32
    mags = m[:_TOP[signed] + 1]
    assert mags[0] == 0 and mags[-1] == 1 and np.all(np.diff(mags) > 0)
    codes = np.arange(1, _TOP[signed] + 1, dtype=np.uint32)
    np.testing.assert_array_equal(mags[1:].view(np.uint32), (codes + _BASE[signed]) << 20)
    assert mags[1] == np.float32(2.0 ** (-16 if signed else -32) * 1.25)
    gaps = np.diff(mags[1:].astype(np.float64)) / mags[1:-1]     # relative to the lower value
    assert gaps.min() == 1 / 15 and gaps.max() == 1 / 8           # 3 mantissa bits everywhere
    if signed:   # sign-magnitude: code | 0x80 is the negative
        np.testing.assert_array_equal(m[128:], -mags)
        assert float(m[0x80 | 127]) == -1.0


@pytest.mark.parametrize("signed", [True, False])
def test_decode_is_bitwise_the_table(signed):
    codes = jnp.arange(256, dtype=jnp.uint8).reshape(2, 128)
    absmax = jnp.array([0.5, 3.0], jnp.float32)
    q = QuantizedArray(codes, absmax, (256,), "float32", signed, "float8")
    expected = (float8_map(signed).reshape(2, 128) * np.array([[0.5], [3.0]], np.float32))
    for got in (dequantize_blockwise(q), jax.jit(dequantize_blockwise)(q)):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                      expected.reshape(-1).view(np.uint32))


# --------------------------------------------------------------------------------------------
# nearest rounding


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_equal_brute_force(signed):
    rng = np.random.default_rng(0)
    lo = -1.0 if signed else -0.1
    y = np.concatenate([
        rng.uniform(lo, 1.0, 100_000),
        np.exp(rng.uniform(-50.0, 0.0, 100_000)) * (rng.choice([-1.0, 1.0], 100_000)
                                                      if signed else 1.0),
        _edge_values(signed), [0.0, -0.0, 1.0, 1e-45, 3e-38]]).astype(np.float32)
    got = np.asarray(_float8_codes(jnp.asarray(y), signed, exclude_zero=False))
    np.testing.assert_array_equal(got, _reference_nearest(y, signed))
    got_jit = np.asarray(jax.jit(_float8_codes, static_argnums=(1, 2))(jnp.asarray(y), signed,
                                                                      False))
    np.testing.assert_array_equal(got_jit, got)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_over_a_stride_of_all_float32_in_0_1(signed):
    # every 509th float32 bit pattern in [0, 1]: about 2.1 million values, all binades
    y = np.arange(0, 0x3F800001, 509, dtype=np.uint32).view(np.float32)
    got = np.asarray(_float8_codes(jnp.asarray(y), signed, exclude_zero=False))
    np.testing.assert_array_equal(got, _reference_nearest(y, signed))


def test_ties_go_to_the_even_key_and_to_zero_at_the_bottom():
    mags = _magnitudes(True)
    # between 0.5 (key 1008, even) and 0.5625 (1009): 0.53125 goes down; between 0.5625 and
    # 0.625 (1010, even) 0.59375 goes up
    y = jnp.array([0.53125, 0.59375, -0.59375, float(mags[1]) / 2], jnp.float32)
    codes = np.asarray(_float8_codes(y, True, exclude_zero=False))
    assert float8_map(True)[codes].tolist() == [0.5, 0.625, -0.625, 0.0]


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_relative_error_is_at_most_half_a_mantissa_step(signed):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-6, 3, (64, 1)))).astype(np.float32)
    if not signed:
        x = x * x
    q = quantize_blockwise(jnp.asarray(x), signed=signed, code_map="float8")
    y = np.asarray(dequantize_blockwise(q)).astype(np.float64)
    absmax = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    smallest = float(_magnitudes(signed)[1]) * absmax
    big = np.abs(x) >= smallest
    assert np.all(np.abs(y - x)[big] <= np.abs(x)[big] / 16 * (1 + 1e-6))
    assert np.all(np.abs(y - x)[~big] <= smallest.repeat(256, 1)[~big] / 2)


def test_zeros_nonfinite_blocks_and_unsigned_negatives():
    x = jnp.array([[0.0, -0.0, 0.0, 0.0], [1.0, jnp.nan, 2.0, 3.0], [1.0, -2.0, 0.0, 4.0]])
    y = dequantize_blockwise(quantize_blockwise(x, block_size=4, code_map="float8"))
    assert np.asarray(y[0]).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert not np.signbit(np.asarray(y[0])).any()                 # the code of 0 is 0, not -0
    assert np.isnan(np.asarray(y[1])).all()
    np.testing.assert_array_equal(np.asarray(y[2]), [1.0, -2.0, 0.0, 4.0])
    u = quantize_blockwise(jnp.array([-1.0, 0.5, 1.0, -0.0]), block_size=4, signed=False,
                           code_map="float8")
    assert np.asarray(dequantize_blockwise(u)).tolist() == [0.0, 0.5, 1.0, 0.0]
    inf = quantize_blockwise(jnp.array([1.0, jnp.inf]), block_size=2, code_map="float8")
    assert np.isnan(np.asarray(dequantize_blockwise(inf))).all()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exclude_zero_keeps_tiny_values_off_the_zero_code(rounding):
    x = jnp.array([1.0, 1e-12, 0.0, -1e-12] + [0.5] * 4)
    key = jax.random.key(0)
    signed_q = quantize_blockwise(x, signed=True, exclude_zero=True, rounding=rounding, key=key,
                                  code_map="float8")
    unsigned_q = quantize_blockwise(x, signed=False, exclude_zero=True, rounding=rounding,
                                    key=key, code_map="float8")
    s, u = float8_map(True)[1], float8_map(False)[1]
    assert np.asarray(dequantize_blockwise(signed_q))[:4].tolist() == [1.0, s, 0.0, -s]
    assert np.asarray(dequantize_blockwise(unsigned_q))[:4].tolist() == [1.0, u, 0.0, 0.0]
    plain = quantize_blockwise(x, signed=True, rounding=rounding, key=key, code_map="float8")
    assert np.asarray(dequantize_blockwise(plain))[:4].tolist() == [1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# stochastic rounding


@pytest.mark.parametrize("signed,y", [
    (True, 0.3), (True, -0.3), (True, 0.97), (True, 0.5 + 1 / 64),   # inside binades
    (True, 0.499), (False, 0.249),                                    # just below a binade
    (True, 1.0e-5), (True, -1.0e-5), (False, 1.0e-10),                # below the smallest value
    (False, 0.7), (False, 0.001)])
def test_stochastic_rounding_is_unbiased_on_the_two_neighbours(signed, y):
    n = 200_000
    x = jnp.full((n,), y, jnp.float32).at[0].set(1.0)       # absmax 1: the codes see y itself
    q = quantize_blockwise(x, signed=signed, block_size=n, rounding="stochastic",
                           key=jax.random.key(3), code_map="float8")
    values = np.asarray(dequantize_blockwise(q))[1:].astype(np.float64)
    mags = _magnitudes(signed)
    hi = np.searchsorted(mags, abs(y))
    neighbours = {mags[hi - 1] * np.sign(y), mags[hi] * np.sign(y)} if mags[hi] != abs(y) \
        else {mags[hi] * np.sign(y)}
    assert set(np.unique(values)) <= neighbours, (np.unique(values), neighbours)
    spread = max(neighbours, key=abs) - min(neighbours, key=abs) if len(neighbours) > 1 else 0
    assert abs(values.mean() - y) <= 4 * abs(spread) / np.sqrt(n) + 1e-12


def test_stochastic_rounding_is_deterministic_per_key_and_exact_on_map_values():
    x = jnp.asarray(np.random.default_rng(2).standard_normal(4096).astype(np.float32))
    a = quantize_blockwise(x, rounding="stochastic", key=jax.random.key(1), code_map="float8")
    b = quantize_blockwise(x, rounding="stochastic", key=jax.random.key(1), code_map="float8")
    c = quantize_blockwise(x, rounding="stochastic", key=jax.random.key(2), code_map="float8")
    assert np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert not np.array_equal(np.asarray(a.codes), np.asarray(c.codes))
    exact = jnp.asarray(float8_map(True))                    # absmax 1: every value is a code
    q = quantize_blockwise(exact, block_size=256, rounding="stochastic", key=jax.random.key(0),
                           code_map="float8")
    np.testing.assert_array_equal(np.asarray(dequantize_blockwise(q)), float8_map(True))


def test_top_twenty_random_bits_are_uniform():
    # the stochastic encoder adds the hash's top 20 bits: halfway between two codes about half
    # of the elements must round up
    words = key_words(jax.random.key(0))
    bits = np.asarray(random_bits(words, (4, 1024))) >> 12
    assert bits.max() < 2 ** 20 and 0.45 < (bits >= 2 ** 19).mean() < 0.55


# --------------------------------------------------------------------------------------------
# QuantizedArray and quantized_state with the float8 map


def test_quantized_array_carries_its_map_and_rejects_unknown_ones():
    q = quantize_blockwise(jnp.ones(300), code_map="float8")
    assert q.code_map == "float8" and "code_map='float8'" in repr(q)
    assert "code_map" not in repr(quantize_blockwise(jnp.ones(300)))
    leaves, treedef = jax.tree.flatten(q)
    assert jax.tree.unflatten(treedef, leaves).code_map == "float8"
    with pytest.raises(ValueError, match=r"code_map='fp8'.*'dynamic', 'float8'"):
        quantize_blockwise(jnp.ones(3), code_map="fp8")
    with pytest.raises(ValueError, match="code_map"):
        quantized_state(gradtx.adam(1e-3), code_map="fp8")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_wrapper_update_is_the_inner_update_on_the_dequantized_state(rounding):
    params = _params()
    inner = gradtx.adamw(1e-2, weight_decay=1e-3)
    tx = quantized_state(inner, rounding=rounding, code_map="float8")
    assert tx != quantized_state(inner, rounding=rounding)
    assert "code_map='float8'" in repr(tx)
    g1 = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    g2 = jax.tree.map(lambda p: jnp.cos(p * 5.0), params)
    state = tx.init(params)
    adam = state.inner_state[0]
    assert adam.mu["w1"].code_map == "float8" and adam.nu["w1"].code_map == "float8"
    assert adam.mu["w1"].signed and not adam.nu["w1"].signed
    _, s = jax.jit(tx.update)(g1, state, params)
    u_q, s2 = tx.update(g2, s, params)
    u_ref, s_ref = inner.update(g2, dequantized(s.inner_state), params)
    for a, b in zip(jax.tree.leaves(u_q), jax.tree.leaves(u_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if rounding == "nearest":   # the new state is the reference state encoded with float8
        ref_mu = quantize_blockwise(s_ref[0].mu["w1"], code_map="float8")
        np.testing.assert_array_equal(np.asarray(s2.inner_state[0].mu["w1"].codes),
                                      np.asarray(ref_mu.codes))
    assert jax.tree.structure(s2) == jax.tree.structure(state)


def test_compiled_float8_step_has_no_gather_and_no_float32_temporary():
    tx = quantized_state(gradtx.adamw(1e-3), code_map="float8")
    params = {"w": jnp.ones((256, 512))}

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params),
                                                          params).compile()
    assert "gather(" not in compiled.as_text()
    # the codes may be copied (8 bits each, no compiler_options here); no float32 moment is kept
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * 512 * 4


@pytest.mark.parametrize("name,make,tol", [
    # measured quantized/float32 final loss (stochastic, float8 map): see the test's assertion
    ("adamw", lambda: gradtx.adamw(3e-3, weight_decay=1e-4), 0.02),
    ("sgd_momentum", lambda: gradtx.sgd(0.1, momentum=0.9), 0.02),
    ("lamb", lambda: gradtx.lamb(3e-3), 0.02),
    ("lion", lambda: gradtx.lion(3e-4, weight_decay=1e-3), 0.02),
])
def test_training_parity_stochastic(name, make, tol):
    loss = _problem()
    ref, start = _train(make(), loss)
    q, _ = _train(quantized_state(make(), code_map="float8"), loss)
    assert ref < 0.1 * start, (name, ref, start)
    assert abs(q - ref) <= tol * ref, (name, q, ref)
