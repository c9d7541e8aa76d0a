"""gradtx.counter_random: the counter-based random bits behind stochastic rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradtx.counter_random import fmix32, key_words, random_bits, stream_words, uniforms


def _reference_bits(words, n):
    """The documented formula on numpy uint32: fmix32((i ^ w1) * 0x9E3779B1 + w0), i = 0..n-1."""
    w0, w1 = (np.uint32(w) for w in np.asarray(words))
    h = (np.arange(n, dtype=np.uint32) ^ w1) * np.uint32(0x9E3779B1) + w0
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5), (2, 1, 3, 256)])
def test_bits_hash_the_row_major_index_whatever_the_shape(shape):
    words = key_words(jax.random.key(11))
    n = int(np.prod(shape, dtype=np.int64))
    got = np.asarray(random_bits(words, shape))
    assert got.shape == shape and got.dtype == np.uint32
    np.testing.assert_array_equal(got.reshape(-1), _reference_bits(words, n))
    np.testing.assert_array_equal(np.asarray(jax.jit(random_bits, static_argnums=1)(words, shape)),
                                  got)


def test_raw_and_typed_keys_give_the_same_words_and_streams_differ():
    key = jax.random.key(4)
    np.testing.assert_array_equal(np.asarray(key_words(key)),
                                  np.asarray(key_words(jax.random.key_data(key))))
    words = key_words(key)
    a, b = (np.asarray(stream_words(words, jnp.uint32(s))) for s in (0, 1))
    assert a.dtype == np.uint32 and a.shape == (2,) and not np.array_equal(a, b)
    assert np.asarray(fmix32(jnp.uint32(0))) == 0            # the finaliser fixes 0: inputs are mixed first


def test_uniforms_lie_in_the_unit_interval_with_their_resolution():
    words = key_words(jax.random.key(2))
    u32 = np.asarray(uniforms(words, (64, 1024)))
    assert u32.dtype == np.float32 and u32.min() >= 0 and u32.max() < 1
    np.testing.assert_array_equal(u32 * 2.0**24, np.floor(u32 * 2.0**24))      # 24-bit grid
    assert abs(u32.mean() - 0.5) < 0.01 and abs(u32.var() - 1 / 12) < 0.005
    with jax.enable_x64(True):
        u64 = np.asarray(uniforms(words, (64, 1024), jnp.float64))
    assert u64.dtype == np.float64 and u64.min() >= 0 and u64.max() < 1
    np.testing.assert_array_equal(u64 * 2.0**32, np.floor(u64 * 2.0**32))      # 32-bit grid
    assert np.mean(u64 * 2.0**24 != np.floor(u64 * 2.0**24)) > 0.9             # finer than 24
