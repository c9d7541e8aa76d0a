"""Tests of gradtx.quantization: 8-bit block-wise quantized optimizer state."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from gradtx.counter_random import key_words, uniforms  # noqa: E402
from compilations import count_compilations  # noqa: E402
from exact_checks import same_shaped_step_computations  # noqa: E402
from gradtx.quantization import (_CONSTANTS, _MAPS, _MIDPOINTS, DEFAULT_UNSIGNED_FIELDS,  # noqa: E402
                                 QuantizedArray, QuantizedState, _block_absmax,
                                 _nearest_codes, _stochastic_codes,
                                 dequantize_blockwise, dynamic_map, float8_map,
                                 quantize_blockwise, quantized_state)


def _half_gap(signed):
    m = dynamic_map(signed).astype(np.float64)
    return float(np.max(np.diff(m)) / 2)


# --------------------------------------------------------------------------------------------
# the map


def test_dynamic_map_shape_and_range():
    s, u = dynamic_map(True), dynamic_map(False)
    assert s.shape == u.shape == (256,) and s.dtype == np.float32
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
    assert s[-1] == 1.0 and 0.0 in s and s[0] < -0.99
    assert u[0] == 0.0 and u[-1] == 1.0 and np.all(u >= 0)
    # non-linear: fine near 1, the smallest non-zero magnitude is 10**-6 * 0.55
    assert np.isclose(np.min(np.abs(s[s != 0])), 0.55e-6, rtol=1e-5)
    assert np.isclose(np.min(u[u != 0]), 0.325e-6, rtol=1e-5)  # 2 intervals in 1e-6 decade
    # signed map is symmetric apart from 1.0 (there is no -1)
    pos = np.sort(s[s > 0])[:-1]
    assert np.allclose(pos, np.sort(-s[s < 0]))
    # resolution at the top: signed 0.9/64, unsigned 0.9/128
    assert np.isclose(s[-2] - s[-3], 0.9 / 64, rtol=1e-4)
    assert np.isclose(u[-2] - u[-3], 0.9 / 128, rtol=1e-4)
    assert _half_gap(True) < 0.0075 and _half_gap(False) < 0.0045


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 64])
def test_round_trip_error_bound_per_block(signed, block_size):
    rng = np.random.default_rng(0)
    n = 5000  # not a multiple of the block size: exercises the padding
    x = rng.standard_normal(n).astype(np.float32) * np.exp(rng.uniform(-8, 3, n)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    q = quantize_blockwise(jnp.asarray(x), signed=signed, block_size=block_size)
    nb = -(-n // block_size)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (nb, block_size)
    assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (nb,)
    y = np.asarray(dequantize_blockwise(q))
    assert y.shape == x.shape and y.dtype == np.float32
    padded = np.concatenate([x, np.zeros(nb * block_size - n, np.float32)]).reshape(nb, block_size)
    absmax = np.abs(padded).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    err = np.abs(np.concatenate([y, np.zeros(nb * block_size - n, np.float32)]) - padded.reshape(-1))
    bound = (_half_gap(signed) + 1e-6) * np.repeat(absmax, block_size)
    assert np.all(err <= bound)
    # the block's largest magnitude is (nearly) exact, relative errors of mid-size values small
    big = np.abs(padded.reshape(-1)) >= 0.1 * np.repeat(absmax, block_size)
    rel = err[big] / np.abs(padded.reshape(-1)[big])
    assert rel.max() < (0.08 if signed else 0.04)


def test_nearest_code_is_chosen():
    m = dynamic_map(True)
    # every map value is reproduced exactly; midpoints between codes round to one of the two
    x = jnp.asarray(m)
    q = quantize_blockwise(x, block_size=256)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), np.arange(256))
    y = (m[:-1].astype(np.float64) * 0.7 + m[1:] * 0.3).astype(np.float32)  # nearer the lower code
    qy = np.asarray(quantize_blockwise(jnp.asarray(np.append(y, 1.0))).codes).reshape(-1)[:-1]
    np.testing.assert_array_equal(qy, np.arange(255))


def test_zeros_and_zero_blocks():
    x = jnp.concatenate([jnp.zeros(256), jnp.array([0.0, 3.0, -2.0, 0.0] * 64)])
    for signed in (True, False):
        q = quantize_blockwise(jnp.abs(x) if not signed else x, signed=signed)
        y = dequantize_blockwise(q)
        assert q.absmax.tolist()[0] == 0.0
        assert bool(jnp.all(y[:256] == 0.0))
        assert bool(jnp.all(jnp.where(x == 0, y == 0, True)))
        assert bool(jnp.all(jnp.isfinite(y)))


def test_unsigned_map_clips_negatives_to_zero():
    y = dequantize_blockwise(quantize_blockwise(jnp.array([1.0, -0.5, 0.25]), signed=False))
    assert y.tolist()[1] == 0.0 and y.tolist()[0] == 1.0


def test_nonfinite_poisons_only_its_block():
    x = jnp.ones(512).at[3].set(jnp.nan).at[300].set(jnp.inf)
    y = dequantize_blockwise(quantize_blockwise(x, block_size=256))
    assert bool(jnp.all(jnp.isnan(y[:256])))
    assert bool(jnp.all(jnp.isnan(y[256:])))  # inf block: all NaN too
    x = jnp.ones(512).at[3].set(jnp.nan)
    y = dequantize_blockwise(quantize_blockwise(x, block_size=256))
    assert bool(jnp.all(jnp.isnan(y[:256]))) and bool(jnp.all(y[256:] == 1.0))


def test_dtypes_and_shapes_preserved():
    x = jnp.linspace(-1, 1, 6 * 700).reshape(6, 700).astype(jnp.bfloat16)
    q = quantize_blockwise(x)
    y = dequantize_blockwise(q)
    assert y.dtype == jnp.bfloat16 and y.shape == (6, 700)
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)))) < 0.012
    with pytest.raises(TypeError, match="floating"):
        quantize_blockwise(jnp.arange(4))
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(jnp.ones(4), block_size=0)


def test_quantize_is_jittable_and_vmappable():
    x = jax.random.normal(jax.random.key(1), (3, 1000))
    f = jax.jit(lambda a: dequantize_blockwise(quantize_blockwise(a)))
    np.testing.assert_array_equal(np.asarray(f(x)),
                                  np.asarray(dequantize_blockwise(quantize_blockwise(x))))
    v = jax.vmap(lambda a: dequantize_blockwise(quantize_blockwise(a)))(x)
    assert v.shape == (3, 1000) and float(jnp.max(jnp.abs(v - x))) < 0.0075 * 4.5


# --------------------------------------------------------------------------------------------
# the wrapper: which leaves, memory


def _params(key=0):
    k = jax.random.split(jax.random.key(key), 4)
    return {"w1": jax.random.normal(k[0], (64, 128)) * 0.1, "b1": jnp.zeros(128),
            "w2": jax.random.normal(k[1], (128, 64)) * 0.1, "b2": jnp.zeros(64)}


def test_which_leaves_are_quantized_and_signedness():
    params = _params()
    tx = quantized_state(gradtx.adamw(1e-3))
    state = tx.init(params)
    assert isinstance(state, QuantizedState)
    adam = state.inner_state[0]
    for name in ("w1", "w2"):
        assert isinstance(adam.mu[name], QuantizedArray) and adam.mu[name].signed
        assert isinstance(adam.nu[name], QuantizedArray) and not adam.nu[name].signed
    for name in ("b1", "b2"):
        assert adam.mu[name].dtype == jnp.float32 and adam.mu[name].shape == params[name].shape
    assert adam.count.dtype == jnp.int32
    # override: no unsigned fields -> nu signed; exclude mu
    tx2 = quantized_state(gradtx.adamw(1e-3), unsigned_fields=(), exclude_fields=("mu",))
    a2 = tx2.init(params).inner_state[0]
    assert a2.nu["w1"].signed and not isinstance(a2.mu["w1"], QuantizedArray)
    # min_size threshold is inclusive
    tx3 = quantized_state(gradtx.sgd(0.1, momentum=0.9), min_size=128)
    leaves = jax.tree.leaves(tx3.init(params), is_leaf=lambda x: isinstance(x, QuantizedArray))
    assert sum(isinstance(x, QuantizedArray) for x in leaves) == 3  # w1, b1, w2 (b2 has 64)
    assert "nu" in DEFAULT_UNSIGNED_FIELDS and "sum_of_squares" in DEFAULT_UNSIGNED_FIELDS


def _nbytes(tree):
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_state_bytes_ratio_adamw():
    # a model whose parameters are dominated by big leaves (plus a few small ones kept in f32)
    params = {"emb": jax.ShapeDtypeStruct((1000, 256), jnp.float32),
              "w": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
              "w_out": jax.ShapeDtypeStruct((1024, 100), jnp.float32),
              "b": jax.ShapeDtypeStruct((1024,), jnp.float32),
              "ln": jax.ShapeDtypeStruct((256,), jnp.float32)}
    plain = jax.eval_shape(gradtx.adamw(1e-3).init, params)
    quant = jax.eval_shape(quantized_state(gradtx.adamw(1e-3)).init, params)
    ratio = _nbytes(quant) / _nbytes(plain)
    assert ratio <= 0.27, ratio
    n = sum(int(np.prod(p.shape)) for p in params.values())
    assert 2.0 < _nbytes(quant) / n < 2.1  # ≈ 2.03 bytes per parameter (Dettmers et al.)


# --------------------------------------------------------------------------------------------
# training parity


def _problem():
    k = jax.random.split(jax.random.key(42), 4)
    x = jax.random.normal(k[0], (256, 64))
    a = jax.random.normal(k[1], (64, 32)) / 8.0
    b = jax.random.normal(k[2], (32, 64)) / 6.0
    # a teacher network plus label noise: an irreducible loss floor (~0.01), as in real data, so the
    # comparison is of trained models rather than of how close to zero a noiseless fit can get
    y = jnp.tanh(x @ a) @ b + 0.1 * jax.random.normal(k[3], (256, 64))

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean((h @ p["w2"] + p["b2"][None, :] - y) ** 2)

    return loss


def _train(tx, loss, steps=300):
    params = _params(1)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (gradtx.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return loss(p)

    return float(run(params)), float(loss(params))


_LION_STALLS = pytest.mark.xfail(
    strict=True, reason="known gap of round-to-nearest (the reason stochastic rounding is the "
    "default): Lion's b2=0.99 momentum increments (1% of g) fall below half a code step and the "
    "momentum stops moving late in a noiseless full-batch run (final loss 1.59x float32 here)")


@pytest.mark.parametrize("name,make,rounding,tol", [
    # measured quantized/float32 final loss (stochastic, seed 0): AdamW 0.999, SGD 1.0003,
    # LAMB 1.011, Lion 0.995 (seeds 1 and 2 within 0.2% of these)
    ("adamw", lambda: gradtx.adamw(3e-3, weight_decay=1e-4), "stochastic", 0.02),
    ("sgd_momentum", lambda: gradtx.sgd(0.1, momentum=0.9), "stochastic", 0.02),
    ("lamb", lambda: gradtx.lamb(3e-3), "stochastic", 0.02),
    ("lion", lambda: gradtx.lion(3e-4, weight_decay=1e-3), "stochastic", 0.02),
    # round to nearest: AdamW 0.975, LAMB 1.09 (above the 2% target), Lion 1.59
    ("adamw", lambda: gradtx.adamw(3e-3, weight_decay=1e-4), "nearest", 0.03),
    ("lamb", lambda: gradtx.lamb(3e-3), "nearest", 0.12),
    pytest.param("lion", lambda: gradtx.lion(3e-4, weight_decay=1e-3), "nearest", 0.02,
                 marks=_LION_STALLS),
])
def test_training_parity(name, make, rounding, tol):
    loss = _problem()
    ref, start = _train(make(), loss)
    q, _ = _train(quantized_state(make(), rounding=rounding), loss)
    assert ref < 0.1 * start, (name, ref, start)  # the problem is actually being optimised
    assert abs(q - ref) <= tol * ref, (name, rounding, q, ref)


# --------------------------------------------------------------------------------------------
# the transform contract


def test_contract_jit_eval_shape_structure_no_recompile():
    params = _params()
    tx = quantized_state(gradtx.adamw(1e-3))
    abstract = jax.eval_shape(tx.init, params)
    state = tx.init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)))
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    g = jax.tree.map(jnp.ones_like, params)
    u, s1 = step(g, state, params)
    u, s2 = step(g, s1, params)
    assert len(traces) == 1
    assert jax.tree.structure(s1) == jax.tree.structure(state) == jax.tree.structure(s2)
    assert all(a.dtype == b.dtype and a.shape == b.shape
               for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(state)))
    # eager and jitted agree exactly
    ue, _ = tx.update(g, s1, params)
    for a, b in zip(jax.tree.leaves(ue), jax.tree.leaves(u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def test_hashable_equal_repr_and_validation():
    a = quantized_state(gradtx.adamw(1e-3))
    b = quantized_state(gradtx.adamw(1e-3))
    assert a == b and hash(a) == hash(b)
    assert a != quantized_state(gradtx.adamw(1e-3), block_size=128)
    assert repr(a).startswith("quantized_state(inner=")
    assert "block_size" not in repr(a)
    # list input normalised to a tuple (hashable)
    c = quantized_state(gradtx.adamw(1e-3), unsigned_fields=["nu"])
    assert c.unsigned_fields == ("nu",) and hash(c) is not None
    with pytest.raises(ValueError, match="block_size"):
        quantized_state(gradtx.adamw(1e-3), block_size=0)
    with pytest.raises(ValueError, match="min_size"):
        quantized_state(gradtx.adamw(1e-3), min_size=-1)
    with pytest.raises(TypeError, match="unsigned_fields"):
        quantized_state(gradtx.adamw(1e-3), unsigned_fields=(1,))
    with pytest.raises(TypeError, match="inner"):
        quantized_state(3.0)


def dequantized(tree):
    """``tree`` with every :class:`QuantizedArray` replaced by the array it stands for."""
    is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    return jax.tree.map(lambda x: dequantize_blockwise(x) if is_q(x) else x, tree, is_leaf=is_q)


@pytest.mark.parametrize("rounding,gaps", [("nearest", 0.5), ("stochastic", 1.0)])
def test_matches_plain_update_within_quantisation_error(rounding, gaps):
    # one step from a quantized state equals the inner update from the dequantized state exactly
    params = _params()
    inner = gradtx.chain(gradtx.scale_by_adam(), gradtx.scale_by_learning_rate(1e-2))
    tx = quantized_state(inner, rounding=rounding)
    g1 = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    g2 = jax.tree.map(lambda p: jnp.cos(p * 5.0), params)
    _, s = tx.update(g1, tx.init(params), params)
    deq = dequantized(s.inner_state)
    u_q, _ = tx.update(g2, s, params)
    u_ref, _ = inner.update(g2, deq, params)
    for a, b in zip(jax.tree.leaves(u_q), jax.tree.leaves(u_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the dequantized moments are within half a code gap (nearest) or one gap (stochastic)
    # of the float32 ones, relative to each block's absmax
    _, s_ref = inner.update(g1, inner.init(params), params)
    gap = 2 * _half_gap(True) * gaps
    for name in ("w1", "w2"):
        m, m_ref = np.asarray(deq[0].mu[name]).reshape(-1, 256), np.asarray(s_ref[0].mu[name])
        absmax = np.abs(m_ref.reshape(-1, 256)).max(axis=1, keepdims=True)
        assert np.all(np.abs(m - m_ref.reshape(-1, 256)) <= (gap + 1e-6) * absmax)


@pytest.mark.parametrize("code_map", ["dynamic", "float8"])
def test_bf16_params_and_state_dtype_kept(code_map):
    params = {"w": jnp.ones((64, 96), jnp.bfloat16)}
    tx = quantized_state(gradtx.adam(1e-2), code_map=code_map)
    state = tx.init(params)
    adam = state.inner_state[0]
    assert isinstance(adam.mu["w"], QuantizedArray) and not adam.nu["w"].signed
    assert adam.mu["w"].dtype == "bfloat16" and adam.mu["w"].code_map == code_map
    u, state2 = jax.jit(tx.update)({"w": jnp.ones((64, 96), jnp.bfloat16)}, state, params)
    assert u["w"].dtype == jnp.bfloat16
    assert jax.tree.structure(state2) == jax.tree.structure(state)
    assert state2.inner_state[0].mu["w"].code_map == code_map     # kept through update
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), -1e-2, rtol=2e-2)


def test_composes_with_masked_and_partition():
    params = _params()
    inner = gradtx.chain(gradtx.masked(gradtx.trace(0.9), {"w1": True, "b1": True, "w2": False,
                                                            "b2": False}),
                         gradtx.scale_by_learning_rate(0.1))
    tx = quantized_state(inner, rounding="nearest")
    state = tx.init(params)
    trace = state.inner_state[0].inner_state.trace
    # per-parameter trees with MaskedNode for the parameters a member does not see are quantized
    # where the member keeps state (w1), and the MaskedNodes are kept
    assert isinstance(trace["w1"], QuantizedArray)
    assert isinstance(trace["w2"], gradtx.MaskedNode) and trace["b1"].dtype == jnp.float32
    g = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(tx.update)
    u1, s1 = step(g, state, params)
    u2, s2 = step(g, s1, params)
    s_ref = inner.init(params)
    ur1, s_ref = inner.update(g, s_ref, params)
    ur2, _ = inner.update(g, s_ref, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(ur1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(ur2)):   # ones are exact codes
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert jax.tree.structure(s2) == jax.tree.structure(state)
    # partition: each group's state has MaskedNode for the other group's parameters
    labels = {"w1": "a", "b1": "a", "w2": "b", "b2": "b"}
    part = quantized_state(gradtx.partition({"a": gradtx.adam(1e-3), "b": gradtx.lion(1e-4)},
                                            labels))
    leaves = jax.tree.leaves(part.init(params), is_leaf=lambda x: isinstance(x, QuantizedArray))
    assert sum(isinstance(x, QuantizedArray) for x in leaves) == 3  # adam mu, nu of w1; lion mu w2


# --------------------------------------------------------------------------------------------
# the arithmetic code search == the binary search over the midpoints


def _reference_codes(y, signed):
    return np.asarray(jnp.searchsorted(jnp.asarray(_MIDPOINTS[signed]), jnp.asarray(y),
                                       side="left")).astype(np.uint8)


def _edge_inputs(signed):
    m = dynamic_map(signed)
    mids = _MIDPOINTS[signed]
    pos_inf, neg_inf = np.float32(np.inf), np.float32(-np.inf)
    near = [m, mids, np.nextafter(mids, pos_inf), np.nextafter(mids, neg_inf),
            np.nextafter(m, pos_inf), np.nextafter(m, neg_inf)]
    decades = np.float32(10.0) ** np.arange(-8, 1, dtype=np.float32)   # decade boundaries
    near += [decades, np.nextafter(decades, pos_inf), np.nextafter(decades, neg_inf)]
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.17e-38, 3e-7,
                        -3e-7, 0.99, -0.99, 0.992969, -0.992969], np.float32)
    x = np.concatenate([a.astype(np.float32).reshape(-1) for a in near] + [special])
    x = np.clip(x, -1.0, 1.0)
    return np.concatenate([x, -x])


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_equal_binary_search(signed):
    # every map value, every midpoint and the floats on either side of it, decade boundaries,
    # zeros, +-1, denormals; then 200k random values over 8 decades of magnitude
    # (the search was also checked for every float32 in [-1, 1] when it was written)
    edge = _edge_inputs(signed)
    np.testing.assert_array_equal(np.asarray(jax.jit(_nearest_codes, static_argnums=1)(
        jnp.asarray(edge), signed)), _reference_codes(edge, signed))
    rng = np.random.default_rng(1)
    x = (np.exp(rng.uniform(np.log(1e-8), 0.0, 200_000)) *
         rng.choice([-1.0, 1.0], 200_000)).astype(np.float32)
    x = np.concatenate([x, rng.uniform(-1, 1, 50_000).astype(np.float32)])
    np.testing.assert_array_equal(np.asarray(_nearest_codes(jnp.asarray(x), signed)),
                                  _reference_codes(x, signed))


def test_quantize_blockwise_codes_equal_binary_search():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 300)).astype(np.float32) * np.float32(0.01)
    q = quantize_blockwise(jnp.asarray(x), block_size=128)
    flat = np.concatenate([x.reshape(-1), np.zeros(q.codes.size - x.size, np.float32)])
    blocks = flat.reshape(-1, 128)
    absmax = np.abs(blocks).max(axis=1)
    normed = np.asarray(jnp.asarray(blocks) / jnp.asarray(absmax)[:, None])
    np.testing.assert_array_equal(np.asarray(q.codes), _reference_codes(normed, True))


# --------------------------------------------------------------------------------------------
# the map as float32 arithmetic: decoding and encoding without table lookups


def _bnb_map_float64(signed):
    """bitsandbytes' create_dynamic_map construction (its defaults), in float64."""
    values = [0.0, 1.0]
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        edges = np.linspace(0.1, 1.0, n + 1)
        means = 10.0 ** (k - 6) * (edges[:-1] + edges[1:]) / 2
        values += list(means) + (list(-means) if signed else [])
    return np.sort(np.asarray(values))


@pytest.mark.parametrize("signed", [True, False])
def test_map_is_float32_arithmetic_close_to_bitsandbytes(signed):
    m = dynamic_map(signed)
    ref = _bnb_map_float64(signed)
    assert m.shape == ref.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[-1] == 1.0 and m[np.flatnonzero(ref == 0.0)[0]] == 0.0
    nonzero = ref != 0
    deviation = np.max(np.abs(m[nonzero] / ref[nonzero] - 1.0))
    assert deviation <= 1e-5, deviation            # stated in dynamic_map: measured 5.8e-6
    # each decade's values are fl32(A_k + B_k * q) with an exact product B_k * q, so a fused
    # multiply-add (one rounding) gives the same float32 as multiply-then-add (two)
    a_k, b_k = _CONSTANTS[signed]
    magnitudes = m[127:] if signed else m
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        q = np.arange(n, 2 * n)
        product = b_k[k] * q.astype(np.float32)
        assert product.dtype == np.float32
        np.testing.assert_array_equal(product.astype(np.float64), np.float64(b_k[k]) * q)
        p = q if signed else q - 1
        np.testing.assert_array_equal(magnitudes[p], a_k[k] + product)
    if signed:   # -1 (no code) is stored as -m[0]: its error is within half the largest gap
        assert 1.0 + m[0] <= np.max(np.diff(m.astype(np.float64))) / 2


@pytest.mark.parametrize("signed", [True, False])
def test_decode_is_bitwise_the_table_eager_and_jit(signed):
    codes = jnp.arange(256, dtype=jnp.uint8).reshape(2, 128)
    q = QuantizedArray(codes, jnp.ones(2, jnp.float32), (256,), "float32", signed)
    table = _MAPS[signed].view(np.uint32)
    for decode in (dequantize_blockwise, jax.jit(dequantize_blockwise)):
        got = np.asarray(decode(q))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), table)
    # times the block's absmax, as the table lookup was
    q2 = QuantizedArray(codes, jnp.array([0.5, 3.0], jnp.float32), (256,), "float32", signed)
    expected = (_MAPS[signed].reshape(2, 128) * np.array([[0.5], [3.0]], np.float32)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blockwise)(q2)), expected)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_compiled_step_has_no_gather(rounding):
    tx = quantized_state(gradtx.adamw(1e-3), rounding=rounding)
    params = {"w": jnp.ones((64, 128))}
    state = tx.init(params)
    assert isinstance(state.inner_state[0].mu["w"], QuantizedArray)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    text = jax.jit(step).lower(params, state, params).compile().as_text()
    assert "gather(" not in text


@pytest.mark.parametrize("block_size", [1, 7, 37, 100, 256, 4096])
def test_block_absmax_equals_max_abs(block_size):
    rng = np.random.default_rng(block_size)
    x = (rng.standard_normal((6, block_size)) * np.exp(rng.uniform(-30, 30, (6, block_size))))
    x = x.astype(np.float32)
    x[1] = -0.0                                              # zeros (negative zero)
    x[2] = rng.choice([-1e-40, 1e-42, 0.0], block_size)      # denormals
    x[3, -1] = -np.inf
    x[4, -1] = np.inf
    x[4, 0] = np.nan                                         # NaN wins over inf
    x[5, block_size // 2] = -np.float32(3.4e38)
    expected = np.max(np.abs(x), axis=1)
    # XLA CPU flushes denormal float operands to zero (the reference jnp.max does too), the int32
    # stage of _block_absmax does not: a block of denormals may give either
    flush = lambda v: np.where(np.abs(v) < np.finfo(np.float32).tiny, 0, v)  # noqa: E731
    for f in (_block_absmax, jax.jit(_block_absmax)):
        got = np.asarray(f(jnp.asarray(x)))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(flush(got), flush(expected))
    assert np.isnan(expected[4]) and expected[3] == np.inf
    # either way a block of denormals reads back as (nearly) zeros, never NaN
    q = quantize_blockwise(jnp.asarray(x[2]), block_size=block_size)
    y = np.asarray(dequantize_blockwise(q))
    assert np.all(np.abs(y) <= np.float32(1e-38))


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_codes_land_on_neighbours_at_edges(signed):
    # map values, midpoints and their float neighbours, decade boundaries, zeros, +-1, denormals:
    # every draw is one of the two neighbouring map values, and map values are kept exactly
    x = _edge_inputs(signed)
    m = dynamic_map(signed)
    if not signed:
        x = np.abs(x)
    below = m[np.clip(np.searchsorted(m, x, side="right") - 1, 0, 255)]
    above = m[np.clip(np.searchsorted(m, x, side="left"), 0, 255)]
    encode = jax.jit(_stochastic_codes, static_argnums=1)
    seen_above = 0
    for k in range(4):
        u = uniforms(key_words(jax.random.key(k)), (1, x.size)).reshape(-1)
        v = m[np.asarray(encode(jnp.asarray(x), signed, u))]
        ok = (v == below) | (v == above)
        if signed:
            ok |= (x < m[0]) & (v == m[0])                     # -1 has no code
        assert np.all(ok), x[~ok][:5]
        on_map = np.isin(x, m)
        np.testing.assert_array_equal(v[on_map], x[on_map])
        seen_above += int(np.sum((v == above) & (below != above)))
    assert seen_above > 0


@pytest.mark.parametrize("signed,y", [
    (True, 0.2e-6), (False, 0.1e-6),             # between 0 and the smallest non-zero value
    (True, 0.00099), (True, -0.0101),            # between two decades
    (False, 0.0000995), (False, 0.0101),
    (True, 0.9970), (False, 0.9990),             # between the last value and 1
])
def test_stochastic_rounding_unbiased_across_decade_boundaries(signed, y):
    m = dynamic_map(signed).astype(np.float64)
    y32 = float(np.float32(y))
    lo, hi = m[m <= y32].max(), m[m >= y32].min()
    # y lies between the last value of one decade 10**(k-6) * [0.1, 1) (or 0) and the first of
    # the next (or 1)
    assert lo < y32 < hi
    decade = lambda v: int(np.floor(np.log10(abs(v)))) if 0 < abs(v) < 1 else None  # noqa: E731
    assert decade(lo) != decade(hi)
    d = _stochastic_draws(y32, signed)
    assert set(np.unique(d)) <= {lo, hi} and len(np.unique(d)) == 2
    p = (y32 - lo) / (hi - lo)
    se = (hi - lo) * np.sqrt(p * (1 - p) / d.size)
    assert abs(d.mean() - y32) <= 4 * se, (d.mean(), y32, se)


# --------------------------------------------------------------------------------------------
# stochastic rounding


def _stochastic_draws(y, signed, n_keys=8, n=4096):
    """Dequantized values of ``y`` (in [-1, 1]) over n_keys * (n - 1) independent draws."""
    x = jnp.full(n, y, jnp.float32).at[0].set(1.0)        # absmax 1: the block codes y itself
    out = [dequantize_blockwise(quantize_blockwise(x, signed=signed, block_size=n,
                                                   rounding="stochastic",
                                                   key=jax.random.key(k)))[1:]
           for k in range(n_keys)]
    return np.concatenate([np.asarray(o) for o in out]).astype(np.float64)


@pytest.mark.parametrize("signed,y", [(True, 0.3), (True, -0.3), (True, 0.0123), (True, -4e-6),
                                      (True, 0.9962), (False, 0.3), (False, 2.2e-3),
                                      (False, 0.9991), (False, 1e-7)])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(signed, y):
    m = dynamic_map(signed).astype(np.float64)
    y32 = float(np.float32(y))
    lo, hi = m[m <= y32].max(), m[m >= y32].min()
    assert lo < y32 < hi                                   # y is strictly between two codes
    d = _stochastic_draws(y32, signed)
    assert set(np.unique(d)) <= {lo, hi} and len(np.unique(d)) == 2
    p = (y32 - lo) / (hi - lo)
    se = (hi - lo) * np.sqrt(p * (1 - p) / d.size)
    assert abs(d.mean() - y32) <= 4 * se, (d.mean(), y32, se)


def test_stochastic_rounding_exact_values_zero_and_limits():
    # values on the map are kept exactly; zero stays zero; +1 stays +1; -1 has no code (signed
    # map spans [-0.99297, 1]) and becomes the most negative value, as with nearest rounding
    m = dynamic_map(True)
    x = jnp.asarray(np.concatenate([m, [0.0, -1.0]]).astype(np.float32))
    for k in range(3):
        q = quantize_blockwise(x, block_size=x.size, rounding="stochastic", key=jax.random.key(k))
        y = np.asarray(dequantize_blockwise(q))
        np.testing.assert_array_equal(y[:256], m)
        assert y[256] == 0.0 and y[257] == m[0]
    v = float(dynamic_map(False)[200])
    u = quantize_blockwise(jnp.array([1.0, -0.5, 0.0, v]), signed=False, block_size=4,
                           rounding="stochastic", key=jax.random.key(0))
    assert dequantize_blockwise(u).tolist() == [1.0, 0.0, 0.0, v]   # negatives clip to 0


def test_stochastic_rounding_is_deterministic_per_key():
    x = jax.random.normal(jax.random.key(3), (4, 1000))
    q = lambda key: quantize_blockwise(x, rounding="stochastic", key=key)  # noqa: E731
    a, b, c = q(jax.random.key(7)), q(jax.random.key(7)), q(jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    # most values lie between two codes, so another key changes many of them
    assert np.mean(np.asarray(a.codes) != np.asarray(c.codes)) > 0.2
    j = jax.jit(lambda x, key: quantize_blockwise(x, rounding="stochastic", key=key).codes)
    np.testing.assert_array_equal(np.asarray(j(x, jax.random.key(7))), np.asarray(a.codes))
    with pytest.raises(ValueError, match="key"):
        quantize_blockwise(x, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        quantize_blockwise(x, rounding="up")


def test_wrapper_stochastic_deterministic_per_step_and_fresh_across_steps():
    params = _params()
    tx = quantized_state(gradtx.adam(1e-2))               # stochastic is the default
    assert tx.rounding == "stochastic"
    g = jax.tree.map(lambda p: jnp.sin(p * 9.0), params)
    step = jax.jit(tx.update)
    s0 = tx.init(params)
    assert int(s0.count) == 0
    _, s1 = step(g, s0, params)
    _, s1_again = step(g, s0, params)
    assert int(s1.count) == 1
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s1_again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the same new moments quantized at another step (count) or with another seed: other draws
    _, s1_later = step(g, s0._replace(count=jnp.int32(41)), params)
    _, s1_seed = jax.jit(quantized_state(gradtx.adam(1e-2), seed=1).update)(g, s0, params)
    mu = lambda s: np.asarray(s.inner_state[0].mu["w1"].codes)  # noqa: E731
    assert np.mean(mu(s1) != mu(s1_later)) > 0.1 and np.mean(mu(s1) != mu(s1_seed)) > 0.1
    # and different leaves draw different numbers: two equal moments get different codes
    twin = {"a": params["w1"], "b": params["w1"]}
    _, st = jax.jit(quantized_state(gradtx.sgd(0.1, momentum=0.9)).update)(
        {"a": g["w1"], "b": g["w1"]}, quantized_state(gradtx.sgd(0.1, momentum=0.9)).init(twin),
        twin)
    tr = st.inner_state[0].trace
    assert np.mean(np.asarray(tr["a"].codes) != np.asarray(tr["b"].codes)) > 0.1
    with pytest.raises(ValueError, match="rounding"):
        quantized_state(gradtx.adam(1e-2), rounding="up")
    with pytest.raises(ValueError, match="seed"):
        quantized_state(gradtx.adam(1e-2), seed=-1)


def test_stream_numbers_live_in_the_state_and_drive_the_draws():
    """``init`` numbers each quantized array's random stream by its position among the state's
    leaves (``QuantizedState.streams``); ``update`` keeps the numbers, and an array's draws follow
    its number, not where it sits in the tree."""
    x = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
    params = {"a": x, "b": x, "c": jnp.ones(3)}                   # "c" stays float32
    tx = quantized_state(gradtx.sgd(0.1, momentum=0.9), min_size=1000)
    state = tx.init(params)
    leaves = jax.tree.leaves(state.inner_state, is_leaf=lambda v: isinstance(v, QuantizedArray))
    positions = [i for i, v in enumerate(leaves) if isinstance(v, QuantizedArray)]
    assert len(positions) == 2
    assert [int(s) for s in state.streams] == positions
    assert all(s.dtype == jnp.uint32 and s.shape == () for s in state.streams)

    grads = {"a": jnp.sin(x * 7.0), "b": jnp.sin(x * 7.0), "c": jnp.ones(3)}
    step = jax.jit(tx.update)
    _, new = step(grads, state, params)
    assert [int(s) for s in new.streams] == positions              # kept by update
    codes = lambda s, k: np.asarray(s.inner_state[0].trace[k].codes)  # noqa: E731
    assert np.mean(codes(new, "a") != codes(new, "b")) > 0.1     # equal moments, own draws
    swapped = state._replace(streams=state.streams[::-1])
    _, new_swapped = step(grads, swapped, params)
    np.testing.assert_array_equal(codes(new_swapped, "a"), codes(new, "b"))
    np.testing.assert_array_equal(codes(new_swapped, "b"), codes(new, "a"))

    for bad, what in ((state.streams[:1], "1 stream numbers"), (None, "a NoneType")):
        with pytest.raises(gradtx.TreeMismatchError,
                           match=rf"state.streams holds {what} for 2 quantized arrays.*init"):
            tx.update(grads, state._replace(streams=bad), params)


@pytest.mark.parametrize("code_map", ["dynamic", "float8"])
def test_same_shaped_leaves_share_their_compiled_encoders(code_map):
    """With stochastic rounding, every quantized array's encoder is the same XLA computation for
    the same shape: the stream number is a buffer of the state, not a constant of the step. When
    it was a constant (the array's position), each array got an encoder of its own for XLA to
    compile (AdamW over 100 leaves of 64x64: 10.1 s against 6.3 s, float8 map)."""
    tx = quantized_state(gradtx.adamw(1e-3), code_map=code_map)
    assert tx.rounding == "stochastic"
    distinct = functools.partial(same_shaped_step_computations, tx, shape=(64, 64))
    assert distinct(2) == distinct(6)


def test_vmap_and_eval_shape_with_stochastic_state():
    params = {"w": jnp.ones((64, 96))}
    tx = quantized_state(gradtx.lion(1e-3, weight_decay=0.0))
    abstract = jax.eval_shape(tx.init, params)
    assert abstract.count.dtype == jnp.int32
    states = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
    grads = {"w": jnp.stack([jnp.full((64, 96), v) for v in (1.0, -1.0, 0.5)])}
    u, s = jax.vmap(lambda g, s: tx.update({"w": g}, s, params))(grads["w"], states)
    assert u["w"].shape == (3, 64, 96) and s.count.tolist() == [1, 1, 1]
    np.testing.assert_allclose(np.asarray(u["w"][:, 0, 0]), [-1e-3, 1e-3, -1e-3], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# random trees: quantized == plain within the stated tolerance

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.sampled_from([(3,), (40, 7), (300,), (17, 33), (4, 8, 9)]),
                      min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 16), rounding=st.sampled_from(["nearest", "stochastic"]),
       code_map=st.sampled_from(["dynamic", "float8"]))
def test_random_trees_match_plain_within_tolerance(sizes, seed, rounding, code_map):
    # SGD with momentum is linear in its state: after two steps the quantized update differs from
    # the plain one by lr * mu * (error of the stored trace, the first gradient). Dynamic map:
    # <= gap * absmax of the block (gap: half the largest code spacing for nearest, the full
    # spacing for stochastic). Float8 map: relative, <= |g| / 16 (nearest) or |g| / 8
    # (stochastic), plus the smallest value s * absmax for elements below it
    rng = np.random.default_rng(seed)
    params = {f"p{i}": jnp.asarray(rng.standard_normal(s).astype(np.float32))
              for i, s in enumerate(sizes)}
    g1 = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)),
                      params)
    g2 = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)),
                      params)
    lr, mu = 0.1, 0.9
    plain = gradtx.sgd(lr, momentum=mu)
    tx = quantized_state(plain, min_size=64, block_size=64, rounding=rounding, code_map=code_map)
    _, s = _TREE_STEP(tx, g1, tx.init(params), params)
    u_q, _ = _TREE_STEP(tx, g2, s, params)
    sp = plain.init(params)
    _, sp = plain.update(g1, sp, params)
    u_p, _ = plain.update(g2, sp, params)
    gap = 2 * _half_gap(True) * (0.5 if rounding == "nearest" else 1.0)
    for name, g in g1.items():
        a, b = np.asarray(u_q[name]), np.asarray(u_p[name])
        if g.size < 64:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)   # kept in float32
            continue
        flat = np.concatenate([np.asarray(g).reshape(-1), np.zeros(-g.size % 64, np.float32)])
        absmax = np.repeat(np.abs(flat.reshape(-1, 64)).max(axis=1), 64)[:g.size]
        if code_map == "float8":
            relative = (1 / 16 if rounding == "nearest" else 1 / 8) + 1e-6
            smallest = float(float8_map(True)[1])
            error = relative * np.abs(np.asarray(g).reshape(-1)) + smallest * absmax
        else:
            error = (gap + 1e-6) * absmax
        bound = lr * mu * error + 1e-6
        assert np.all(np.abs(a - b).reshape(-1) <= bound), name


def _tree_step(tx, g, s, p):
    return tx.update(g, s, p)


_TREE_STEP = jax.jit(_tree_step, static_argnums=0)


def test_no_recompilation_across_steps_stochastic():
    params = _params()
    tx = quantized_state(gradtx.lion(1e-3))
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    s = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, s = step(g, s, params)
    assert len(traces) == 1 and int(s.count) == 3
    assert hash(tx) == hash(quantized_state(gradtx.lion(1e-3)))
    assert tx != quantized_state(gradtx.lion(1e-3), rounding="nearest")
    assert "rounding" not in repr(tx) and "seed=3" in repr(quantized_state(tx.inner, seed=3))


# --------------------------------------------------------------------------------------------
# the digits classifier of the examples


def test_digits_classifier_quantized_adamw_and_lion_match_float32():
    """The examples' MLP on the digits: 200 steps of batch 64 with float32 state and with 8-bit
    state (default: stochastic rounding) end within 2% in training loss (mean of the last 5% of
    the steps; measured AdamW 0.998x, Lion 0.996x; with round-to-nearest 0.971x and 1.014x).
    The same runs as benchmarks/quantized.py."""
    pytest.importorskip("sklearn")
    nnx = pytest.importorskip("flax.nnx")
    import os
    import sys
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "examples")
    sys.path.insert(0, examples)
    try:
        import _common
    finally:
        sys.path.remove(examples)
    x_train, y_train, _, _ = _common.load_digits_split()
    idx = _common.batches(len(x_train), 64, 200, seed=0)
    xb, yb = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
    graphdef, params, rest = nnx.split(_common.MLP(rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, x, y):
        return _common.cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    def final_loss(tx):
        @jax.jit
        def run(params):
            def step(carry, batch):
                p, s = carry
                value, grads = jax.value_and_grad(loss)(p, *batch)
                u, s = tx.update(grads, s, p)
                return (gradtx.apply_updates(p, u), s), value
            _, losses = jax.lax.scan(step, (params, tx.init(params)), (xb, yb))
            return jnp.mean(losses[-10:]), losses[0]
        return [float(v) for v in run(params)]

    for make in (lambda: gradtx.adamw(1e-3, weight_decay=1e-2),
                 lambda: gradtx.lion(3e-4, weight_decay=1e-1)):
        ref, first = final_loss(make())
        q, _ = final_loss(quantized_state(make()))
        assert ref < 0.25 * first, (ref, first)                  # it actually trains
        assert abs(q - ref) <= 0.02 * ref, (make(), q, ref)


# --------------------------------------------------------------------------------------------
# no zero point for second moments


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exclude_zero_keeps_tiny_values_off_the_zero_code(rounding):
    key = jax.random.key(0) if rounding == "stochastic" else None
    x = jnp.array([1.0, 1e-9, -1e-9, 0.0, 0.3, -0.3], jnp.float32)
    smallest = {s: float(np.min(np.abs(dynamic_map(s)[dynamic_map(s) != 0]))) for s in (True, False)}
    for signed in (True, False):
        plain = dequantize_blockwise(quantize_blockwise(x, signed=signed, block_size=6,
                                                        rounding=rounding, key=key))
        kept = dequantize_blockwise(quantize_blockwise(x, signed=signed, block_size=6,
                                                       rounding=rounding, key=key,
                                                       exclude_zero=True))
        assert plain[1] == 0.0 and plain[2] == 0.0           # bitsandbytes' behaviour: flushed
        assert float(kept[1]) == smallest[signed]            # the smallest positive code
        assert float(kept[2]) == (-smallest[True] if signed else 0.0)   # unsigned: clips to 0
        assert kept[3] == 0.0 and kept[0] == 1.0             # zeros stay zero, the absmax exact
        np.testing.assert_array_equal(np.asarray(kept[4:]), np.asarray(plain[4:]))


def test_quantized_second_moment_is_never_flushed_to_zero():
    # one large gradient and many tiny ones in the same 256-block: (1 - b2) g^2 of the tiny ones
    # is 1e-10 of the block's absmax, below the smallest unsigned code (0.325e-6). Flushed to 0,
    # Adam's update there would be m / eps = 1e4 learning rates; kept at the smallest code it is
    # bounded by m / sqrt(0.325e-6 absmax)
    g = jnp.full((64, 128), 1e-3, jnp.float32).at[0, 0].set(100.0)
    params = jnp.zeros((64, 128), jnp.float32)
    tx = quantized_state(gradtx.adam(1.0, eps=1e-8), rounding="nearest")
    updates, state = jax.jit(tx.update)(g, tx.init(params), params)
    nu = dequantize_blockwise(state.inner_state[0].nu)
    assert bool(jnp.all(nu > 0))
    assert float(jnp.max(jnp.abs(updates[1:]))) < 10.0


# --------------------------------------------------------------------------------------------
# many leaves: compile cost warning and the flattened composition


def test_init_warns_when_many_arrays_would_be_quantized(monkeypatch):
    import gradtx.quantization as q
    monkeypatch.setattr(q, "_MANY_QUANTIZED_ARRAYS", 6)
    tx = quantized_state(gradtx.adamw(1e-3))            # two quantized moments per big leaf
    few = {f"w{i}": jnp.zeros((64, 64)) for i in range(2)}
    many = {f"w{i}": jnp.zeros((64, 64)) for i in range(3)}
    small = {f"w{i}": jnp.zeros((8, 8)) for i in range(40)}   # under min_size: not quantized
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.init(few)
        tx.init(small)
    with pytest.warns(UserWarning, match=r"6 state arrays are quantized one by one.*gradtx\.flatten"
                      r".*code_map='float8' compiles about 3x faster"):
        tx.init(many)
    with pytest.warns(UserWarning, match="quantized one by one") as caught:
        quantized_state(gradtx.adamw(1e-3), code_map="float8").init(many)
    assert "code_map='float8' compiles" not in str(caught[0].message)   # already float8
    with warnings.catch_warnings():                      # the suggested fix silences it
        warnings.simplefilter("error")
        gradtx.flatten(tx).init(many)


@pytest.mark.parametrize("code_map", ["dynamic", "float8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_traced_step_holds_the_codec_once_not_per_leaf(code_map, rounding):
    """The encoder, decoder and per-leaf random words are traced once per shape and called from
    each leaf: a quantized leaf adds a few dozen equations to the traced update, not the codec's
    hundreds (113-359 per leaf when traced inline; tracing 100 leaves then took seconds). The
    results of such a step are checked against the plain optimizer by the other tests."""
    tx = quantized_state(gradtx.adamw(1e-3), code_map=code_map, rounding=rounding)

    def equations(n):
        params = {f"w{i}": jnp.ones((64, 64)) for i in range(n)}
        state = jax.eval_shape(tx.init, params)
        jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params)
        return len(jaxpr.jaxpr.eqns)
    per_leaf = (equations(12) - equations(4)) / 8
    assert per_leaf <= 40, per_leaf


@pytest.mark.parametrize("code_map", ["dynamic", "float8"])
def test_init_compiles_one_program_per_quantized_leaf_kind(code_map):
    """``init`` encodes each leaf with one compiled program per (shape, field kind), not op by op:
    run eagerly, the encoder's ~180 primitives were each compiled anew for every new leaf shape
    (about 2 s per distinct shape on CPU). The state equals ``init`` under ``jit``."""
    tx = quantized_state(gradtx.adamw(1e-3), code_map=code_map)
    # shapes no other test uses (per code map), so no encoder is compiled for them yet
    offset = 0 if code_map == "dynamic" else 5
    params = {f"w{i}": jnp.ones((67 + i + offset, 89 + 2 * i)) for i in range(3)}
    jax.block_until_ready(params)
    with count_compilations() as compiles:
        state = tx.init(params)
        jax.block_until_ready(state)
    # per leaf: the inner AdamW's zeros, then one encoder for mu (signed), one for nu (unsigned)
    assert compiles[0] <= 3 * len(params), compiles
    jitted = jax.jit(tx.init)(params)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = state.inner_state[0].mu["w0"]
    assert isinstance(leaf, QuantizedArray) and leaf.code_map == code_map


@pytest.mark.parametrize("code_map", ["dynamic", "float8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_flattened_quantized_state_is_quantized_state_of_the_concatenation(rounding, code_map):
    # flatten(quantized_state(adamw)) keeps one quantized buffer per dtype and computes exactly
    # what quantized_state(adamw) computes on the concatenated parameters
    keys = jax.random.split(jax.random.key(3), 8)
    shapes = [(64, 64), (300,), (32, 130), (4096,)]
    params = {f"p{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}
    inner = gradtx.adamw(1e-2, weight_decay=1e-2)
    tx = gradtx.flatten(quantized_state(inner, rounding=rounding, code_map=code_map))
    ref = quantized_state(inner, rounding=rounding, code_map=code_map)
    leaves = jax.tree.leaves(params)
    flat_p = {"float32": jnp.concatenate([x.ravel() for x in leaves])}
    state, ref_state = tx.init(params), ref.init(flat_p)
    mu = state.inner_state.inner_state[0].mu["float32"]
    assert isinstance(mu, QuantizedArray) and mu.shape == (sum(x.size for x in leaves),)
    assert mu.code_map == code_map
    step = jax.jit(tx.update)
    ref_step = jax.jit(ref.update)
    for t in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(p * (3.0 + t)), params)
        flat_g = {"float32": jnp.concatenate([x.ravel() for x in jax.tree.leaves(grads)])}
        u, state = step(grads, state, params)
        u_ref, ref_state = ref_step(flat_g, ref_state, flat_p)
        got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(u)])
        np.testing.assert_allclose(got, np.asarray(u_ref["float32"]), rtol=1e-6, atol=1e-9)
        params = gradtx.apply_updates(params, u)
        flat_p = gradtx.apply_updates(flat_p, u_ref)
    codes = state.inner_state.inner_state[0].nu["float32"].codes
    ref_codes = ref_state.inner_state[0].nu["float32"].codes
    assert np.mean(np.asarray(codes) != np.asarray(ref_codes)) < 1e-3


def test_flattened_quantized_state_keeps_the_transform_contract():
    # hashable and equal by value, eval_shape matches init, one trace over many donated steps
    make = lambda: gradtx.flatten(quantized_state(gradtx.adamw(1e-3), min_size=64))  # noqa: E731
    tx = make()
    assert tx == make() and hash(tx) == hash(make())
    assert repr(tx) == ("flatten(quantized_state(inner=" + repr(gradtx.adamw(1e-3))
                        + ", min_size=64))")
    params = {"a": jnp.ones((8, 40)), "b": [jnp.zeros(30), jnp.full((5, 9), 0.5, jnp.float32)]}
    state = tx.init(params)
    abstract = jax.eval_shape(tx.init, params)
    # a repr that survives a tree map over the state (children that are not arrays)
    shapes = jax.tree.map(lambda x: x.shape, state)
    assert "QuantizedArray(shape=(395,), dtype=float32, signed=True, block_size=?)" in repr(shapes)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == \
        [(a.shape, a.dtype) for a in jax.tree.leaves(state)]
    traces = []

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    p = jax.tree.map(jnp.array, params)
    for t in range(3):
        g = jax.tree.map(lambda x, t=t: jnp.cos(x + t), params)
        p, state = step(p, state, g)
    assert len(traces) == 1
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
