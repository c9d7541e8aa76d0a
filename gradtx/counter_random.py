"""Counter-based random bits for stochastic rounding: a hash of each element's index, not Threefry.

Stochastic rounding needs a fresh uniform number per element per step, nothing cryptographic. JAX's
Threefry (``jax.random.bits``) costs 20 rounds of arithmetic per pair of words: on the 2-core CPU
it made rounding a 16M-element bfloat16 step take ~250 ms (a float32 AdamW step takes ~17 ms), and
each leaf's unrolled rounds took ~0.1 s to compile. Here one Threefry evaluation per step draws two
32-bit words from the key (a scalar computation); every element's bits are then

    bits[i] = fmix32((i ^ w1) * 0x9E3779B1 + w0)       (uint32 arithmetic, wrapping)

with ``i`` the element's row-major index (modulo 2**32) and ``fmix32`` MurmurHash3's 32-bit
finaliser, a bijection with full avalanche: a handful of integer operations that XLA fuses into the
rounding loop. The numbers are a pure function of the key and the index, identical under ``jit``
and eagerly, and split with sharding like any elementwise function of ``iota``.

Several arrays rounded in one step each need their own numbers: :func:`stream_words` hashes the
step's words with a per-array *stream number*. Keep that number a runtime value (a buffer of the
optimizer state) rather than a Python constant: XLA compiles every distinct fused computation
separately (~10 ms each on CPU) and shares computations that differ only in their buffers, so a
constant stream number would give every array a rounding loop of its own to compile.

Used by :class:`gradtx.quantized_state` and :class:`gradtx.stochastic_rounding` (and
:func:`gradtx.stochastic_round`); no public symbols.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.tree import TreeMismatchError

__all__: list[str] = []


def fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def key_words(key):
    """Two 32-bit words drawn from ``key`` (a typed key or raw ``uint32`` key data): one Threefry
    evaluation, a scalar computation."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)


@jax.jit
def stream_words(words, stream):
    """The words of stream ``stream`` (uint32) from a step's ``words``: two scalar hashes, not
    another Threefry evaluation per array. Jitted, so it is traced once, not once per array."""
    a = stream * np.uint32(0x9E3779B1) + np.uint32(1)        # uint32 arithmetic wraps mod 2**32
    b = stream * np.uint32(0x85EBCA6B)
    return jnp.stack([fmix32(words[0] ^ a), fmix32(words[1] + b)])


def random_bits(words, shape):
    """32 random bits (uint32) per element of an array of ``shape``: ``fmix32((i ^ w1) *
    0x9E3779B1 + w0)`` with ``i`` the element's row-major index modulo 2**32."""
    shape = tuple(int(d) for d in shape)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return fmix32((index ^ words[1]) * np.uint32(0x9E3779B1) + words[0])


def uniforms(words, shape, dtype=jnp.float32):
    """One uniform number in ``[0, 1)`` per element: the top 24 of :func:`random_bits` as a
    float32 (multiples of 2**-24), or all 32 as a float64 when ``dtype`` is float64."""
    bits = random_bits(words, shape)
    if jnp.dtype(dtype) == jnp.dtype(jnp.float64):
        return bits.astype(jnp.float64) * np.float64(2.0 ** -32)
    return (bits >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def stream_numbers(leaves, rounded) -> tuple:
    """The stream numbers an optimizer state keeps: for each leaf that ``rounded(leaf)`` selects,
    its position in ``leaves``, as a uint32 scalar array (a tuple, in order)."""
    return tuple(jnp.asarray(i % 2**32, jnp.uint32) for i, leaf in enumerate(leaves)
                 if rounded(leaf))


def check_streams(owner: str, streams, expected: int, what: str) -> None:
    """Raise a :class:`gradtx.TreeMismatchError` naming ``owner`` unless ``streams`` is a tuple
    of ``expected`` stream numbers (one per ``what``)."""
    if isinstance(streams, tuple) and len(streams) == expected:
        return
    held = f"{len(streams)} stream numbers" if isinstance(streams, tuple) else \
        f"a {type(streams).__name__}"
    raise TreeMismatchError(
        f"{owner}: state.streams holds {held} for {expected} {what}; it must be a tuple of "
        f"{expected} uint32 scalars, one per {what}, as {owner}.init builds it. Build the state "
        f"with init (a state saved before streams existed lacks them: take streams from a fresh "
        f"init of the same optimizer and parameters).")
