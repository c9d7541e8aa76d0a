"""8-bit block-wise quantized optimizer state (Dettmers et al., ICLR 2022; bitsandbytes).

:class:`quantized_state` wraps any optimizer and stores every large per-parameter floating state
leaf of its state (Adam's ``mu``/``nu``, Lion's ``mu``, ``trace``'s momentum, ...) as a
:class:`QuantizedArray`: one ``uint8`` code per element plus one float32 absmax scale per block of
256 elements, about 1.016 bytes per element instead of 4. The inner optimizer is not changed: the
wrapper dequantizes its state before each update and quantizes the new state after.

The array functions :func:`quantize_blockwise` / :func:`dequantize_blockwise` and the two code
books, :func:`dynamic_map` (bitsandbytes', the default) and :func:`float8_map` (an 8-bit float,
encoded and decoded with a few integer operations), are public too.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import compiler, numerics
from gradtx.counter_random import (check_streams, key_words, random_bits, stream_numbers,
                                   stream_words, uniforms)
from gradtx.base import Transform, option, transform
from gradtx.combine import NO_REPLAY, MaskedNode, _check_member, call_update
from gradtx.tree import TreeMismatchError

__all__ = [
    "quantized_state", "QuantizedState", "QuantizedArray", "quantize_blockwise",
    "dequantize_blockwise", "dynamic_map", "float8_map", "DEFAULT_UNSIGNED_FIELDS",
]


# --------------------------------------------------------------------------------------------
# The dynamic (tree) quantisation map
#
# Magnitude index p: 0 is the value 0; decade k = 0..6 (values 10**(k-6) * [0.1, 1]) holds the
# n_k indices p in [P_k, P_k + n_k), with n_k = P_k = 2**k (signed map) or n_k = 2**(k+1),
# P_k = 2**(k+1) - 1 (unsigned); the top index (128 signed, 255 unsigned) is the value 1. With
# the integer q = p (signed) or p + 1 (unsigned), decade k is q in [n_k, 2 n_k) and bitsandbytes'
# value there is linear in q. The map is DEFINED as value(q) = fl32(A_k + B_k * q) with float32
# constants whose B_k has at most 24 - bitlength(2 n_k - 1) significant bits (23 - k signed,
# 22 - k unsigned, so at least 16): B_k * q is then exact in float32 for every q of the decade,
# and the value is the same whether or not a compiler fuses the multiply-add, eagerly, under jit
# and on every backend. Decoding (:func:`_magnitude_value`) and both encoders compute map values
# this way, picking the decade's constants with comparisons and selects (:func:`_per_decade`),
# instead of looking them up in a table: XLA fuses that arithmetic into every consumer, where a
# gather is materialised (and on CPU runs as a scalar loop).

_MAX_DEVIATION = 1e-5    # asserted: |map / bitsandbytes' float64 map - 1| (measured 5.8e-6)


def _decade(signed: bool, k: int):
    """Decade ``k``: ``n_k``, its integers ``q = n_k .. 2 n_k - 1`` (float64) and bitsandbytes'
    float64 values there, ``10**(k-6) * (0.1 + 0.9 * (q - n_k + 0.5) / n_k)`` (the midpoints of
    ``n_k`` equal intervals of ``[0.1, 1]``, scaled to the decade)."""
    n = 2 ** k if signed else 2 ** (k + 1)
    q = np.arange(n, 2 * n, dtype=np.float64)
    return n, q, 10.0 ** (k - 6) * (0.1 + 0.9 * (q - n + 0.5) / n)


def _decade_constants(signed: bool):
    """float32 ``A_k, B_k`` (``k = 0..6``) of ``value(q) = fl32(A_k + B_k * q)``.

    ``B_k`` is the exact slope ``0.9 * 10**(k-6) / n_k`` rounded to the most significant bits
    that keep ``B_k * q`` exact for ``q < 2 n_k``; ``A_k`` the offset that spreads the slope's
    rounding error evenly (equal relative deviation, of opposite signs, at the two ends of the
    decade), rounded to float32."""
    a_k, b_k = [], []
    for k in range(7):
        n, q, v = _decade(signed, k)
        slope = 0.9 * 10.0 ** (k - 6) / n
        bits = 24 - (2 * n - 1).bit_length()
        mantissa, exponent = np.frexp(slope)
        b = np.ldexp(np.round(np.ldexp(mantissa, bits)), exponent - bits)
        lo, hi = v[0], v[-1]
        a = (lo - slope * q[0]) - (b - slope) * (q[0] / lo + q[-1] / hi) / (1 / lo + 1 / hi)
        a_k.append(a)
        b_k.append(b)
    return np.asarray(a_k, np.float32), np.asarray(b_k, np.float32)


_CONSTANTS = {True: _decade_constants(True), False: _decade_constants(False)}
_TOP = {True: 128, False: 255}      # the magnitude index of the value 1
_N = {True: 2 ** np.arange(7), False: 2 ** np.arange(1, 8)}   # n_k: decade k is q in [n_k, 2n_k)


def _build_dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of the dynamic quantisation map (see :func:`dynamic_map`),
    computed with the float32 operations of :func:`_magnitude_value`; checked against
    bitsandbytes' float64 construction."""
    a_k, b_k = _CONSTANTS[signed]
    magnitudes, reference = [np.zeros(1, np.float32)], [np.zeros(1)]
    for k in range(7):
        _, q, v = _decade(signed, k)
        assert np.all((b_k[k] * q).astype(np.float32) == b_k[k] * q)        # exact products
        magnitudes.append(a_k[k] + b_k[k] * q.astype(np.float32))         # float32 ops
        reference.append(v)
    magnitudes.append(np.ones(1, np.float32))
    mag, ref = np.concatenate(magnitudes), np.concatenate(reference + [np.ones(1)])
    assert mag.dtype == np.float32 and mag.shape == (_TOP[signed] + 1,)
    assert np.max(np.abs(mag[1:-1] / ref[1:-1] - 1.0)) <= _MAX_DEVIATION
    table = np.concatenate([-mag[1:-1][::-1], mag]) if signed else mag       # no -1
    assert table.shape == (256,) and np.all(np.diff(table) > 0)
    # signed: -1 is stored as the most negative value, its error within half the largest gap
    assert not signed or 1.0 - float(mag[-2]) <= np.max(np.diff(table.astype(np.float64))) / 2
    return table


_MAPS = {True: _build_dynamic_map(True), False: _build_dynamic_map(False)}
# decision thresholds of nearest rounding: the float32 midpoints between consecutive map values,
# computed as the encoder computes them, (lo + hi) * 0.5 (the halving is exact)
_MIDPOINTS = {s: (m[:-1] + m[1:]) * np.float32(0.5) for s, m in _MAPS.items()}
assert all(x.dtype == np.float32 for x in _MIDPOINTS.values())
# the signed map is symmetric apart from +1: negative values use the positive magnitudes
assert np.array_equal(-_MAPS[True][:127][::-1], _MAPS[True][128:255])
assert np.array_equal(-_MIDPOINTS[True][:127][::-1], _MIDPOINTS[True][127:254])


def _per_decade(masks, *columns):
    """Per element, entry ``k`` of each column (a numpy array indexed by decade), where ``k`` is
    the number of true ``masks`` (``masks[i]``: in decade ``i + 1`` or above, so each mask
    implies the one before): one select per column and decade boundary, instead of a gather
    (which XLA will not fuse into several consumers, and runs as a scalar loop on CPU)."""
    out = [jnp.full(jnp.shape(masks[0]), c[0], jnp.float32) for c in columns]
    for k, mask in enumerate(masks, 1):
        out = [jnp.where(mask, c[k], o) for c, o in zip(columns, out)]
    return out


def _magnitude_value(p, signed: bool):
    """The float32 map value of the int32 magnitude indices ``p`` (``0 <= p <= top``):
    ``fl32(A_k + B_k * q)`` in the decade ``k`` of ``q``, then ``0`` and ``1`` at the ends.
    Bit for bit the table (:data:`_MAPS`), without a gather."""
    a_k, b_k = _CONSTANTS[signed]
    q = p if signed else p + 1
    a, b = _per_decade([q >= int(n) for n in _N[signed][1:]], a_k, b_k)
    value = a + b * q.astype(jnp.float32)
    return jnp.where(p == 0, jnp.float32(0), jnp.where(p >= _TOP[signed], jnp.float32(1), value))


class _EncoderTables(NamedTuple):
    """Per-decade constants of the encoders (numpy, indexed by decade ``k = 0..6``)."""

    inverse: np.ndarray     # 1 / B_k: (a - A_k) * inverse_k estimates the q of a magnitude a
    last: np.ndarray        # the decade's last q, 2 n_k - 1 (float32)
    first: np.ndarray       # the decade's first value, value(n_k)
    above: np.ndarray       # the value after its last: the next decade's first, or 1
    bounds: np.ndarray      # 8 int32 bit patterns of the midpoints below each decade's first
    #                         value and below 1: 0 | decade 0 | decade 1 | ... | decade 6 | 1


def _encoder_tables(signed: bool) -> _EncoderTables:
    """The :class:`_EncoderTables` of a map, read off the map itself (so exactly its values and
    :data:`_MIDPOINTS`)."""
    mag = _MAPS[signed][127:] if signed else _MAPS[signed]            # indexed by p
    mids = _MIDPOINTS[signed][127:] if signed else _MIDPOINTS[signed]  # between p and p + 1
    n = _N[signed]
    first_p = n if signed else n - 1
    bounds = np.append(mids[first_p - 1], mids[_TOP[signed] - 1])
    return _EncoderTables(
        inverse=(1.0 / _CONSTANTS[signed][1].astype(np.float64)).astype(np.float32),
        last=(2 * n - 1).astype(np.float32), first=mag[first_p], above=mag[first_p + n],
        bounds=bounds.astype(np.float32).view(np.int32))


_ENCODER = {True: _encoder_tables(True), False: _encoder_tables(False)}


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic quantisation map of 8-bit optimizers, as a sorted float32 numpy array.

    Dettmers et al.'s *dynamic tree* quantisation: a code is a sign (signed map only), an exponent
    written as a run of leading zero bits, an indicator bit, and a linear fraction in the remaining
    bits. Equivalently, the map holds, for each decade ``10**(k-6)``, ``k = 0..6``, the midpoints
    of ``n_k`` equal intervals of ``[0.1, 1]`` times ``10**(k-6)``, with ``n_k = 2**k`` (signed,
    each with both signs) or ``2**(k+1)`` (unsigned: the sign bit becomes one more fraction bit);
    plus ``0`` and ``1``. So small magnitudes get coarse relative steps from far fewer codes and
    large ones are resolved finely: the relative spacing near 1 is ``0.9/64`` (signed) and
    ``0.9/128`` (unsigned), and the smallest non-zero magnitude is ``0.55e-6`` (signed) or
    ``0.325e-6`` (unsigned).

    The signed map spans ``[-0.99297, 1]`` (there is no code for ``-1``: a block's most negative
    value, when it sets the absmax, is stored as ``-0.99297·absmax``) and the unsigned map
    ``[0, 1]``.

    **Relation to bitsandbytes.** The same construction as bitsandbytes' ``create_dynamic_map``
    (its defaults), with the values of each decade rounded so that decoding is exact float32
    arithmetic instead of a table lookup. Inside decade ``k`` the values are linear in an integer
    ``q`` (the magnitude index, plus one for the unsigned map): bitsandbytes' value is
    ``10**(k-6) * (0.1 + 0.9 * (q - n_k + 0.5) / n_k)`` for ``q = n_k .. 2 n_k - 1``. gradtx
    *defines* it as ``fl32(A_k + B_k * q)`` with float32 constants, ``B_k`` the slope rounded to
    ``24 - bitlength(2 n_k - 1)`` significant bits (so that ``B_k * q`` is exact and the result is
    the same with or without a fused multiply-add, eagerly, under jit and on every backend) and
    ``A_k`` the offset that balances the rounding over the decade. The values are within
    ``1.4e-6`` (signed) and ``5.8e-6`` (unsigned) relative of bitsandbytes' float64 values (at
    most 0.16% of the gap to the next value; bitsandbytes' float32 table is within ``6e-8``), and
    ``0`` and ``1`` are exact. Codes are interchangeable with bitsandbytes' to that precision.

    Example:
        >>> from gradtx.quantization import dynamic_map
        >>> m = dynamic_map(signed=False)
        >>> m.shape, float(m[0]), float(m[-1]), bool((m[1:] > m[:-1]).all())
        ((256,), 0.0, 1.0, True)
    """
    return _MAPS[bool(signed)].copy()


# --------------------------------------------------------------------------------------------
# The float8 map
#
# A code's magnitude bits c (7 signed, 8 unsigned) stand for the float32 whose bit pattern is
# (c + _F8_BASE) << 20: a float with 3 mantissa bits, the top code being 1.0 (the float32 key
# 127 << 3 of exponent 0, mantissa 0). Encoding is rounding a float32's bit pattern to 20 fewer
# bits (carries move into the exponent by themselves) and decoding is a shift: a few integer
# operations per element, against the dozens of comparisons and selects of the decimal decades
# of the dynamic map.

_CODE_MAPS = ("dynamic", "float8")
_F8_DROP = 20                                       # float32 mantissa bits not kept (23 - 3)
_F8_TOP = {True: 127, False: 255}                   # the magnitude code of 1.0
_F8_BASE = {s: (127 << 3) - top for s, top in _F8_TOP.items()}


def _float8_magnitudes(signed: bool) -> np.ndarray:
    """float32 values of the magnitude codes ``0 .. top`` (0, then increasing to 1)."""
    c = np.arange(_F8_TOP[signed] + 1, dtype=np.uint32)
    bits = (c + np.uint32(_F8_BASE[signed])) << np.uint32(_F8_DROP)
    bits[0] = 0
    return bits.view(np.float32)


def float8_map(signed: bool = True) -> np.ndarray:
    """The 256 values of the float8 quantisation map, indexed by code (a float32 numpy array).

    An 8-bit floating-point format with 3 mantissa bits whose largest value is ``1`` (a block's
    absmax scales into it):

    * signed (first moments): a sign bit (``0x80``) and 7 magnitude bits, 4 of exponent (16
      binades, ``2**-16 · 1.25`` to ``1``, about 4.7 decades), like FP8 E4M3;
    * unsigned (second moments): 8 magnitude bits, 5 of exponent (32 binades, ``2**-32 · 1.25``
      to ``1``, about 9.5 decades).

    Magnitude code ``c >= 1`` is the float32 with bit pattern ``(c + base) << 20`` (``base`` =
    889 signed, 761 unsigned) and code 0 is 0 (signed code ``0x80`` is ``-0.0``, never produced
    by the encoder). Consecutive values are ``2**-3`` of their binade apart: the relative gap is
    between 6.7% and 12.5% at every scale, where :func:`dynamic_map`'s is 1.4% just below 1 but
    14% at 0.1 and 28% at 0.01 (signed). Nearest rounding is round-to-nearest-even of the
    float32 bit pattern and stochastic rounding adds 20 random bits before truncating, so
    both encoders are a few integer operations per element (see :func:`quantize_blockwise`,
    ``code_map="float8"``). There is no bitsandbytes or Optax equivalent; torch's
    ``float8_e4m3fn`` has the same signed grid between ``2**-6`` and ``1`` but no per-block
    scale.

    Example:
        >>> from gradtx.quantization import float8_map
        >>> m = float8_map(signed=True)
        >>> m.shape, float(m[0]), float(m[127]), float(m[126]), float(m[0x80 | 127])
        ((256,), 0.0, 1.0, 0.9375, -1.0)
    """
    magnitudes = _float8_magnitudes(bool(signed))
    if signed:
        return np.concatenate([magnitudes, -magnitudes])
    return magnitudes.copy()


def _float8_values(codes, signed: bool):
    """float32 map values of uint8 ``codes`` (:func:`float8_map`): a shift and a select."""
    c = codes.astype(jnp.uint32)
    magnitude = c & np.uint32(0x7F) if signed else c
    bits = jnp.where(magnitude == 0, np.uint32(0),
                     (magnitude + np.uint32(_F8_BASE[signed])) << np.uint32(_F8_DROP))
    if signed:
        bits = bits | ((c & np.uint32(0x80)) << np.uint32(24))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _float8_codes(y, signed: bool, exclude_zero: bool, noise=None):
    """Codes of ``y`` (float32, ``|y| <= 1``) in :func:`float8_map`.

    ``noise=None``: the nearest value, ties to the value with an even key (round-to-nearest-even
    of the float32 bit pattern); below the smallest non-zero value ``s``, 0 up to ``s/2``
    (inclusive) and ``s`` above. ``noise`` (uint32, one per element): stochastic rounding --
    its top 20 bits added to the bit pattern before truncating round up with probability equal
    to the position between the two neighbouring values (they are equally spaced inside a
    binade); below ``s``, ``s`` with probability ``|y| / s`` (24 of its bits as a uniform).
    ``exclude_zero``: a non-zero ``y`` that got the code of 0 gets the smallest code instead.
    Unsigned: negative values (and ``-0.0``) get 0. The sign bit is set only on non-zero codes.
    """
    top, base = np.uint32(_F8_TOP[signed]), np.uint32(_F8_BASE[signed])
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    if signed:
        magnitude = bits & np.uint32(0x7FFFFFFF)
    else:
        magnitude = jax.lax.bitcast_convert_type(jnp.maximum(y, jnp.float32(0)), jnp.uint32)
    smallest = np.uint32((int(base) + 1) << _F8_DROP)           # bit pattern of s
    if noise is None:
        half = np.uint32((1 << (_F8_DROP - 1)) - 1)
        key = (magnitude + half + ((magnitude >> np.uint32(_F8_DROP)) & np.uint32(1))) \
            >> np.uint32(_F8_DROP)
    else:
        key = (magnitude + (noise >> np.uint32(32 - _F8_DROP))) >> np.uint32(_F8_DROP)
    # keys below base + 1 are clamped to the smallest code; the region below s is decided next
    code = jnp.minimum(jnp.maximum(key, base + np.uint32(1)) - base, top)
    a = jax.lax.bitcast_convert_type(magnitude, jnp.float32)
    if noise is None:
        half_smallest = jax.lax.bitcast_convert_type(smallest, jnp.float32) * np.float32(0.5)
        up = a > half_smallest
    else:
        u = (noise >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0 ** -24)
        up = (magnitude >= smallest) | (u * jax.lax.bitcast_convert_type(smallest, jnp.float32) < a)
    if exclude_zero:
        up = up | (magnitude > 0)
    code = jnp.where(up, code, np.uint32(0))
    if signed:
        code = jnp.where(code == 0, code, code | ((bits >> np.uint32(24)) & np.uint32(0x80)))
    return code.astype(jnp.uint8)


# --------------------------------------------------------------------------------------------
# QuantizedArray


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """An array stored as 8-bit block-wise quantized codes (a pytree).

    Children (the only arrays, what checkpoints and ``jax.tree.leaves`` see): ``codes``, ``uint8``
    of shape ``(n_blocks, block_size)`` (the flattened array, zero-padded to whole blocks), and
    ``absmax``, float32 of shape ``(n_blocks,)``. Static auxiliary data: the original ``shape``,
    the original ``dtype`` (name), whether the ``signed`` or unsigned map is used, and which map,
    ``code_map`` (``"dynamic"``: :func:`dynamic_map`, or ``"float8"``: :func:`float8_map`).
    Element ``i`` of block ``b`` stands for ``map[codes[b, i]] * absmax[b]``.
    Build it with :func:`quantize_blockwise`; read it with :func:`dequantize_blockwise`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gradtx.quantization import quantize_blockwise
        >>> q = quantize_blockwise(jnp.ones((3, 100)), block_size=256)
        >>> q.codes.shape, q.absmax.shape, q.shape, q.dtype, q.signed
        ((2, 256), (2,), (3, 100), 'float32', True)
        >>> [x.dtype.name for x in jax.tree.leaves(q)]
        ['uint8', 'float32']
    """

    __slots__ = ("codes", "absmax", "shape", "dtype", "signed", "code_map")

    def __init__(self, codes, absmax, shape: tuple, dtype: str, signed: bool,
                 code_map: str = "dynamic"):
        self.codes = codes
        self.absmax = absmax
        self.shape = tuple(int(d) for d in shape)
        self.dtype = str(dtype)
        self.signed = bool(signed)
        self.code_map = _check_code_map("QuantizedArray", code_map)

    @property
    def block_size(self) -> int:
        return int(np.shape(self.codes)[-1])

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def tree_flatten(self):
        return (self.codes, self.absmax), (self.shape, self.dtype, self.signed, self.code_map)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.codes, obj.absmax = children
        obj.shape, obj.dtype, obj.signed, obj.code_map = aux
        return obj

    def __repr__(self) -> str:
        # the children may be anything after a tree map (shapes, dtypes, None): never fail here
        codes_shape = getattr(self.codes, "shape", None)
        block = codes_shape[-1] if isinstance(codes_shape, tuple) and codes_shape else "?"
        code_map = "" if self.code_map == "dynamic" else f", code_map={self.code_map!r}"
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, signed={self.signed}, "
                f"block_size={block}{code_map})")


_ROUNDINGS = ("nearest", "stochastic")


def _check_code_map(owner: str, code_map) -> str:
    if code_map not in _CODE_MAPS:
        raise ValueError(f"{owner}: code_map={code_map!r} is not one of {list(_CODE_MAPS)} "
                         f"('dynamic': bitsandbytes' map, the default; 'float8': an 8-bit float "
                         f"that encodes several times faster).")
    return code_map


def _magnitude(y, signed: bool):
    """``|y|`` as the encoders see it (unsigned map: negatives clip to 0) and, for the signed map,
    whether ``y < 0`` (else ``None``)."""
    if signed:
        return jnp.abs(y), y < 0
    return jnp.maximum(y, jnp.float32(0)), None


def _to_code(p, negative, signed: bool):
    """uint8 codes of the (float32, integer-valued) magnitude indices ``p``."""
    if signed:
        return jnp.where(negative, 127 - p, 127 + p).astype(jnp.uint8)
    return p.astype(jnp.uint8)


def _nearest_codes(y, signed: bool):
    """Codes of the map values nearest to ``y`` (float32 in ``[-1, 1]``), ties to the lower code:
    bit-for-bit ``searchsorted(_MIDPOINTS, y, side="left")``, without a search or a table lookup.

    The decade holding the nearest value comes from comparisons with the midpoints between
    decades (below a decade's first value; below 1, past which the answer is 1). Inside decade
    ``k``, ``q = floor((|y| - A_k) / B_k)`` names the lower of the two candidate values exactly,
    except right next to a value, where both candidate pairs contain it; one comparison with the
    float32 midpoint ``(value(q) + value(q + 1)) * 0.5`` between them (exactly
    :data:`_MIDPOINTS`) decides. At the decade's ends: between the midpoint below its first value
    and that value the estimate is one q too low, but the line ``A_k + B_k q`` there passes
    ``10**(k-7)``, below the midpoint, so the first value is chosen; above the last value the
    result is clamped to it. Ties: the lower code is the smaller magnitude for ``y >= 0`` and the
    larger for ``y < 0``; on the int32 bit patterns of non-negative floats (ordered like the
    floats) ``|y| >= t`` is ``bits(|y|) + 1 > bits(t)``, so one comparison serves both signs.
    """
    a, negative = _magnitude(y, signed)
    key = jax.lax.bitcast_convert_type(a, jnp.int32)
    if signed:
        key = key + negative.astype(jnp.int32)
    tables, (a_k, b_k) = _ENCODER[signed], _CONSTANTS[signed]
    bounds = tables.bounds
    line_a, line_b, inverse, last = _per_decade(
        [key > bound for bound in bounds[1:7]], a_k, b_k, tables.inverse, tables.last)
    q = jnp.floor((a - line_a) * inverse)
    midpoint = ((line_a + line_b * q) + (line_a + line_b * (q + 1))) * jnp.float32(0.5)
    up = key > jax.lax.bitcast_convert_type(midpoint, jnp.int32)
    q = jnp.minimum(q + up.astype(jnp.float32), last)
    p = q if signed else q - 1
    p = jnp.where(key > bounds[0], p, jnp.float32(0))
    top = jnp.float32(_TOP[signed])
    if signed:
        top = jnp.where(negative, jnp.float32(127), top)   # -1 has no code
    return _to_code(jnp.where(key > bounds[7], top, p), negative, signed)


def _stochastic_codes(y, signed: bool, u):
    """Stochastic rounding of ``y`` between its two neighbouring map values ``lo <= |y| <= hi``:
    up with probability ``(|y| - lo) / (hi - lo)`` (``u`` uniform in ``[0, 1)``, one per element).

    The decade comes from comparisons with the decades' first values; inside it,
    ``q = floor((|y| - A_k) / B_k)`` clamped to the decade, ``lo = value(q)``, and ``hi`` the
    next value (at the decade's last value, the next decade's first or 1). Next to a value the
    estimate may name the pair on the other side of it; the probability then falls just outside
    ``[0, 1]`` and the value itself is chosen. Below the first non-zero value the neighbours are
    0 and that value.
    """
    a, negative = _magnitude(y, signed)
    tables, (a_k, b_k) = _ENCODER[signed], _CONSTANTS[signed]
    line_a, line_b, inverse, last, above = _per_decade(
        [a >= first for first in tables.first[1:]], a_k, b_k, tables.inverse, tables.last,
        tables.above)
    q = jnp.clip(jnp.floor((a - line_a) * inverse), (last + 1) * jnp.float32(0.5), last)
    lo = line_a + line_b * q
    hi = jnp.where(q == last, above, line_a + line_b * (q + 1))
    q = q + (u * (hi - lo) < a - lo).astype(jnp.float32)
    p = q if signed else q - 1
    smallest = tables.first[0]
    p = jnp.where(a >= smallest, p, (u * smallest < a).astype(jnp.float32))
    p = jnp.where(a >= 1, jnp.float32(_TOP[signed]), p)
    if signed:
        p = jnp.where(negative, jnp.minimum(p, jnp.float32(127)), p)   # -1 has no code
    return _to_code(p, negative, signed)


def _block_absmax(blocks):
    """``max |x|`` over each row of ``blocks`` (float32, ``(n_blocks, block_size)``); NaN if the
    row holds a NaN.

    The same result as ``jnp.max(jnp.abs(blocks), axis=1)``, computed so that XLA CPU fuses it
    with whatever produces ``blocks`` (in :class:`quantized_state`: the dequantizing and update
    arithmetic) instead of first writing them to a temporary float32 array (on a 16M-element
    leaf that temporary and its page faults cost more than the rest of the quantisation): the
    maximum of the int32 bit patterns of ``|x|`` (ordered as the non-negative floats are, NaNs
    above +inf) over groups of at most 16 consecutive elements, then a float maximum over the
    groups. A float maximum over a whole block is handed to a library kernel that takes
    materialised input, and one reduction over both stages is split into windows that are.
    """
    n_blocks, size = blocks.shape
    width = max(d for d in range(1, min(size, 16) + 1) if size % d == 0)
    bits = jax.lax.bitcast_convert_type(jnp.abs(blocks), jnp.int32)
    groups = jnp.max(bits.reshape(n_blocks, size // width, width), axis=2)
    return jnp.max(jax.lax.bitcast_convert_type(groups, jnp.float32), axis=1)


def quantize_blockwise(x, *, signed: bool = True, block_size: int = 256,
                       rounding: str = "nearest", key=None,
                       exclude_zero: bool = False, code_map: str = "dynamic") -> QuantizedArray:
    """Quantize ``x`` to 8-bit codes with one float32 absmax scale per block of ``block_size``.

    ``x`` is flattened and zero-padded to whole blocks. For each block ``b``,
    ``absmax_b = max |x_i|`` (float32) and ``y_i = x_i / absmax_b`` is coded with the
    :func:`dynamic_map`:

    * ``rounding="nearest"`` (default): the code of the map value nearest to ``y_i``, ties to the
      lower code -- bit-for-bit ``searchsorted(midpoints, y, side="left")`` over the 255 float32
      midpoints ``(m[i] + m[i+1]) * 0.5`` between consecutive map values, computed without a
      search or a table lookup: the decade of ``|y|`` from comparisons with the midpoints
      between decades, the position inside it from the decade's linear spacing, then one
      comparison with the midpoint between the two candidate codes, computed from their values
      (checked against the search for every float32 in ``[-1, 1]``, both maps).
    * ``rounding="stochastic"``: between the neighbouring map values ``a <= y_i <= b``, ``b`` with
      probability ``(y_i - a) / (b - a)`` and ``a`` otherwise, so that
      ``E[dequantize(quantize(x))] = x`` (unbiased, up to 2**-24 of the code spacing from the
      24-bit uniforms; the one exception is a block's most negative value when it sets the
      absmax: the signed map has no ``-1`` and it is stored as ``-0.99297·absmax``, as with
      nearest rounding). Needs ``key`` (a :func:`jax.random.key` or ``PRNGKey``); the same key
      gives the same codes.

    With the unsigned map negative values clip to code ``0`` (value 0): use it only for
    non-negative data (second moments). Everything is jnp code: jit/vmap/grad-safe, no host work.

    ``code_map="float8"`` codes ``y_i`` with :func:`float8_map` instead (an 8-bit float, 3
    mantissa bits; the array remembers its map in ``QuantizedArray.code_map``): nearest rounding
    is round-to-nearest-even of the float32 bit pattern to 3 mantissa bits (below the smallest
    non-zero value ``s``: 0 up to ``s/2``, ``s`` above), stochastic rounding adds 20 random bits
    to the bit pattern before truncating (unbiased between the two neighbours: they are equally
    spaced inside a binade; below ``s``, ``s`` with probability ``|y|/s``). Both are a few
    integer operations per element, several times cheaper than the dynamic map's decades. The
    error is relative: at most ``|x|/16`` (nearest) or ``|x|/8`` (stochastic) for
    ``|x| >= s·absmax``, with ``s = 2**-16·1.25`` (signed) and ``2**-32·1.25`` (unsigned).

    ``exclude_zero=True`` never stores a non-zero value as the code of 0: a value that would round
    to 0 (below about half the smallest non-zero map value, ``0.55e-6·absmax`` signed,
    ``0.325e-6·absmax`` unsigned) gets the smallest non-zero code of its sign instead; exact
    zeros (and, with the unsigned map, negatives) still get 0. For second moments ``v``, where a
    value flushed to 0 turns ``m / (√v + ε)`` into ``m / ε`` (the *zero-point problem*, Li et al.
    2023, "Memory Efficient Optimizers with 4-bit States"); :class:`quantized_state` uses it for
    its unsigned fields. Default ``False`` (bitsandbytes' behaviour).

    **Error.** Nearest: ``|dequantize(quantize(x)) - x| <= h · absmax_b`` element-wise, where
    ``h`` is half the largest gap between consecutive map values: ``h ≈ 0.0071`` (signed),
    ``0.0036`` (unsigned). Stochastic: at most one gap, ``2h``. Zeros stay exactly zero, and an
    all-zero block is stored with ``absmax = 0`` and dequantizes to zeros. **Non-finite values:**
    a NaN or ±Inf makes its block's absmax NaN and the whole block dequantizes to NaN (other blocks
    are unaffected; the codes of that block are unspecified), the same way a NaN gradient poisons a
    float32 moment.

    bitsandbytes: ``bitsandbytes.functional.quantize_blockwise(x, blocksize=256)`` with the default
    dynamic map (same scheme and map; bitsandbytes quantizes on GPU with its own kernel).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gradtx.quantization import quantize_blockwise, dequantize_blockwise
        >>> q = quantize_blockwise(jnp.array([1.0, -0.5, 0.0, 2.0]), block_size=2)
        >>> q.codes.dtype.name, q.absmax.tolist()
        ('uint8', [1.0, 2.0])
        >>> [round(v, 2) for v in dequantize_blockwise(q).tolist()]
        [1.0, -0.5, 0.0, 2.0]
        >>> x = jnp.full(4096, 0.3).at[0].set(1.0)        # 0.3 lies between two codes
        >>> s = quantize_blockwise(x, block_size=4096, rounding="stochastic", key=jax.random.key(0))
        >>> y = dequantize_blockwise(s)
        >>> len(set(y[1:].tolist())), bool(abs(float(y[1:].mean()) - 0.3) < 1e-3)
        (2, True)
    """
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"quantize_blockwise: block_size={block_size} must be a positive "
                         f"integer (bitsandbytes uses 256).")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"quantize_blockwise: rounding={rounding!r} is not one of "
                         f"{list(_ROUNDINGS)}.")
    if rounding == "stochastic" and key is None:
        raise ValueError("quantize_blockwise: rounding='stochastic' needs a random key; pass "
                         "key=jax.random.key(seed) (the same key gives the same codes).")
    code_map = _check_code_map("quantize_blockwise", code_map)
    words = key_words(key) if rounding == "stochastic" else None
    return _quantize(jnp.asarray(x), bool(signed), block_size, rounding, words,
                     bool(exclude_zero), code_map)


# The encoder and the decoder are jitted: traced once per shape, dtype and options, and called
# from every leaf (and every step that traces them) as one compiled function, which XLA inlines
# into an enclosing jit, so the compiled step is the same. Traced inline, each was a few hundred
# primitives per leaf: 100 leaves of 64x64 took 5.5 s to trace and lower against 0.9 s now, and
# run op by op outside jit, each primitive was compiled separately for every new shape.
_STATIC = ("signed", "block_size", "rounding", "exclude_zero", "code_map")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _quantize(x, signed: bool, block_size: int, rounding: str, words,
              exclude_zero: bool, code_map: str = "dynamic") -> QuantizedArray:
    """:func:`quantize_blockwise` with the stochastic stream given as two uint32 ``words``."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_blockwise: x has dtype {x.dtype}; expected a real floating "
                        f"array.")
    shape, dtype = x.shape, x.dtype
    n = int(np.prod(shape, dtype=np.int64))
    n_blocks = max(1, -(-n // block_size))
    flat = x.reshape(-1).astype(jnp.float32)
    pad = n_blocks * block_size - n
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), jnp.float32)])
    blocks = flat.reshape(n_blocks, block_size)
    absmax = _block_absmax(blocks)
    # a NaN or an infinity in a block: store a NaN scale, so the whole block reads back as NaN
    absmax = jnp.where(jnp.isfinite(absmax), absmax, jnp.float32(jnp.nan))
    safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    normed = blocks / safe[:, None]
    if code_map == "float8":
        noise = None if rounding == "nearest" else random_bits(words, blocks.shape)
        codes = _float8_codes(normed, bool(signed), exclude_zero, noise)
        return QuantizedArray(codes, absmax, shape, jnp.dtype(dtype).name, signed, code_map)
    if rounding == "nearest":
        codes = _nearest_codes(normed, bool(signed))
    else:
        codes = _stochastic_codes(normed, bool(signed), uniforms(words, blocks.shape))
    if exclude_zero:
        codes = _without_zero_code(codes, normed, bool(signed))
    return QuantizedArray(codes, absmax, shape, jnp.dtype(dtype).name, signed)


@functools.partial(jax.jit, static_argnames=("signed", "block_size", "exclude_zero", "code_map"))
def _quantize_initial(x, *, signed: bool, block_size: int, exclude_zero: bool,
                      code_map: str) -> QuantizedArray:
    """:class:`quantized_state`'s initial encoding of an inner state leaf (nearest rounding).

    One compiled program per shape, dtype and options (run op by op, the encoder's primitives
    were each compiled anew for every new leaf shape: about 2 s per distinct shape on CPU). Under
    an enclosing ``jit`` the inner state is usually a constant (zeros), and the barrier keeps XLA
    from constant-folding the whole quantisation at compile time (seconds for a 16M leaf).
    """
    return _quantize(jax.lax.optimization_barrier(x), signed, block_size, "nearest", None,
                     exclude_zero, code_map)


def _without_zero_code(codes, y, signed: bool):
    """``codes`` with every non-zero ``y`` that got the code of 0 moved to the smallest non-zero
    code of its sign (unsigned map: positive ``y`` only; negatives clip to 0)."""
    zero = jnp.uint8(127 if signed else 0)
    at_zero = codes == zero
    codes = jnp.where(at_zero & (y > 0), zero + jnp.uint8(1), codes)
    if signed:
        codes = jnp.where(at_zero & (y < 0), zero - jnp.uint8(1), codes)
    return codes


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
    """The array a :class:`QuantizedArray` stands for: ``map[code] * absmax``, in its dtype.

    ``map[code]`` is computed, not looked up. Dynamic map: the magnitude index ``p`` of the code
    (signed: ``|code - 127|``, negative below 127), its decade's float32 constants picked by six
    comparisons, ``A_k + B_k * q`` (exact products, see :func:`dynamic_map`), ``0`` and ``1`` at
    the ends. Float8 map: the code's magnitude bits shifted into a float32 bit pattern
    (:func:`float8_map`). Either way bit for bit the table value, with no gather, so XLA can fuse the decoding into
    whatever consumes it instead of materialising the float32 array. Then one multiply by the
    block's absmax in float32 and a cast to the original dtype and shape.
    bitsandbytes: ``bitsandbytes.functional.dequantize_blockwise``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx.quantization import quantize_blockwise, dequantize_blockwise
        >>> x = jnp.linspace(-1.0, 1.0, 1000)
        >>> y = dequantize_blockwise(quantize_blockwise(x))
        >>> y.shape, bool(jnp.max(jnp.abs(y - x)) < 0.0075)
        ((1000,), True)
    """
    return _dequantize(q)


@jax.jit
def _dequantize(q: QuantizedArray) -> jax.Array:
    """:func:`dequantize_blockwise`, jitted (see :func:`_quantize`)."""
    if q.code_map == "float8":
        values = _float8_values(q.codes, q.signed)
    else:
        codes = q.codes.astype(jnp.int32)
        if q.signed:
            values = _magnitude_value(jnp.abs(codes - 127), True)
            values = jnp.where(codes >= 127, values, -values)
        else:
            values = _magnitude_value(codes, False)
    values = values * q.absmax.astype(jnp.float32)[:, None]
    n = q.size
    return values.reshape(-1)[:n].reshape(q.shape).astype(q.dtype)


# quantized_state.init warns from this many quantized state arrays on (compile time, see init)
_MANY_QUANTIZED_ARRAYS = 1000
_FLOAT8_COMPILES = (" code_map='float8' compiles about 3x faster in a third of the memory (AdamW "
                    "over 300 leaves of 64x64 with nearest rounding: 12.7 s and 0.9 GB against "
                    "36.9 s and 2.9 GB).")


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


# --------------------------------------------------------------------------------------------
# The wrapper

DEFAULT_UNSIGNED_FIELDS = ("nu", "nu_max", "sum_of_squares", "e_g", "e_x", "v", "v_row", "v_col")
"""State field names whose contents are non-negative (second moments): the unsigned map is used."""


class QuantizedState(NamedTuple):
    """State of :class:`quantized_state`.

    ``count``: int32 number of updates done (saturating); with stochastic rounding it seeds the
    step's random numbers. ``inner_state``: the inner optimizer's state with its large
    per-parameter floating leaves replaced by :class:`QuantizedArray` values (the rest unchanged).
    ``streams``: one uint32 scalar per :class:`QuantizedArray` of ``inner_state`` (in
    ``jax.tree.leaves`` order), the number of its stochastic-rounding stream: its position among
    the leaves of ``inner_state`` when ``init`` built it. Never changed by ``update``; kept in
    the state rather than in the compiled step so that same-shaped arrays share one encoder.
    """

    count: Any
    inner_state: Any
    streams: Any


def _is_masked_node(x) -> bool:
    return isinstance(x, MaskedNode)


def _is_named_tuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _children(node):
    """One level of a pytree node: (children, treedef) or None when ``node`` is a leaf."""
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef) and len(children) == 1 and children[0] is node:
        return None
    return children, treedef


@transform
class quantized_state(Transform):
    """Keep an optimizer's per-parameter state in 8 bits: block-wise dynamic quantisation.

    Wraps any optimizer ``inner`` (a gradtx or Optax transform, a chain, ...). In its state, every
    *per-parameter* floating leaf — found by position: a sub-tree with exactly the parameters'
    structure and every leaf of the matching parameter's shape — with at least ``min_size``
    elements is stored as a :class:`QuantizedArray` (:func:`quantize_blockwise`): uint8 codes and a
    float32 absmax per block of ``block_size`` elements. Smaller leaves, counters, scalars and
    anything else stay as the inner optimizer made them. Each update::

        s = dequantize(state);  u, s' = inner.update(g, s, params);  state' = quantize(s')

    so the inner optimizer runs unchanged, in its own compute dtype, on the dequantized moments.

    **Signed or unsigned map.** Decided statically from the name of the nearest enclosing
    NamedTuple field: fields named in ``unsigned_fields`` (default
    :data:`DEFAULT_UNSIGNED_FIELDS`: ``nu``, ``nu_max``, ``sum_of_squares``, ``e_g``, ``e_x``,
    ``v``, ``v_row``, ``v_col``, the non-negative second-moment statistics of gradtx and Optax) use
    the unsigned map (twice the resolution, negatives clip to 0); all others (``mu``, ``trace``,
    ...) the signed one. Fields named in ``exclude_fields`` are never quantized.

    **No zero point for second moments.** Unsigned fields are quantized with
    ``exclude_zero=True`` (:func:`quantize_blockwise`): a positive value too small for the
    block's smallest non-zero code (``0.325e-6·absmax``) is stored as that code, not as 0. A
    second moment flushed to 0 turns ``m / (√v + ε)`` into ``m / ε`` for that element (Li et al.
    2023 call this the zero-point problem); in LAMB those elements inflate ``‖u‖`` and shrink the
    whole layer's trust ratio. Measured on the digits classifier (``benchmarks/quantized.py``):
    LAMB's final loss 8-bit / float32 1.033 → 1.012 (stochastic) and 1.054 → 1.013 (nearest),
    Adam, AdamW, Lion and SGD unchanged within 0.1%. bitsandbytes flushes to 0.

    Inside :func:`gradtx.masked`, :func:`gradtx.partition` and :func:`gradtx.freeze`, where a
    per-parameter tree holds ``MaskedNode()`` for the parameters its member does not see, the
    other leaves are quantized and the ``MaskedNode`` kept.

    **Code map** (``code_map``, default ``"dynamic"``). ``"dynamic"``: bitsandbytes' dynamic map
    (:func:`dynamic_map`: fine steps near each block's absmax, 1.4% just below it, coarse ones
    further down). ``"float8"``: an 8-bit float with 3 mantissa bits (:func:`float8_map`: a
    6.7-12.5% gap between neighbours at every scale, 4.7 decades below the absmax signed, 9.5
    unsigned), whose encoder and decoder are a few integer operations instead of the dynamic
    map's comparisons and selects: on the 2-core CPU the 8-bit step takes about 2x float32's for
    Adam/AdamW instead of 4-5x, 1.5-1.8x for SGD momentum instead of 3.7x, and 1.2-1.3x for Lion
    instead of 3x (``benchmarks/RESULTS-quantized.md``). Both maps keep the
    examples' final loss within 2% of float32 state with the default stochastic rounding.

    **Rounding** (``rounding``, default ``"stochastic"``). ``"nearest"`` stores the code nearest
    to each new value. ``"stochastic"`` rounds up or down at random with the probabilities that
    make the stored value unbiased (:func:`quantize_blockwise`). An EMA whose per-step increment
    ``(1-β)·g`` is below half a code step (``0.7%`` of the block's absmax near the top of the
    signed map) never moves under nearest rounding; unbiased rounding lets such increments
    accumulate in expectation. Measured (tests/test_quantization.py, benchmarks/quantized.py):
    on a noiseless full-batch MLP, final loss quantized/float32 with nearest rounding Lion 1.59,
    LAMB 1.09, AdamW 0.975; with stochastic rounding 0.993, 1.011, 1.003. Stochastic is therefore
    the default; it costs one hash per element. The random numbers are a pure function of
    ``(seed, step count, stream, element index)``, where an array's stream number is its
    position among the state's leaves, recorded by ``init`` in ``QuantizedState.streams``: two
    runs give identical results, a restored checkpoint continues identically, and
    ``jit``/``vmap``/``eval_shape`` need nothing extra. ``seed`` (an integer option) picks
    other streams.

    **Memory.** An element costs ``1 + 4/block_size`` bytes (plus padding to whole blocks):
    Adam's two moments ≈ 2.03 bytes per parameter instead of 8 (0.254×).

    **Many leaves.** XLA compiles the quantisation of every quantized array separately (on CPU
    ~0.04–0.07 s and ~4–6 MB of compiler memory each at 200 arrays, more per array beyond: the
    2,000 arrays of AdamW over 1,000 leaves of 64×64 exhausted 24 GB), so
    ``init`` warns from 1,000 quantized arrays on. With an elementwise inner optimizer, use
    ``gradtx.flatten(quantized_state(inner))``: one quantized buffer per dtype, the same
    arithmetic as ``quantized_state`` on the concatenated parameters (blocks may then span leaf
    boundaries): at 1,000 leaves of 64×64 it compiles in 13 s and steps in 2.7× float32 AdamW's
    time (``benchmarks/RESULTS-leaves-8bit.md``).

    Defaults follow Dettmers et al. 2022 / bitsandbytes (``bnb.optim.Adam8bit`` and friends):
    ``block_size=256``, ``min_size=4096`` (bitsandbytes' ``min_8bit_size``), the dynamic map.
    Differences from bitsandbytes: this is a wrapper around any optimizer rather than a fused
    kernel per optimizer, so the update is computed in float32 from dequantized moments (the
    same math) but without bitsandbytes' percentile clipping or stable-embedding options; XLA
    fuses the dequantize / update / quantize passes as it can, which on CPU is several times
    slower than a float32 step with the dynamic map and about 2x with ``code_map="float8"`` for
    Adam-like optimizers (see docs/quantization.md). Optax has no equivalent.

    **State:** :class:`QuantizedState` ``(count, inner_state)``. ``min_size``, ``block_size``,
    the field tuples, ``rounding``, ``seed`` and ``code_map`` are options (not hyperparameters that
    :func:`gradtx.inject_hyperparams` could trace); the state's structure does not depend on
    ``rounding``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> from gradtx.quantization import quantized_state
        >>> tx = quantized_state(gradtx.adamw(1e-3), min_size=4096)
        >>> params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)}
        >>> state = tx.init(params)
        >>> adam = state.inner_state[0]
        >>> type(adam.mu["w"]).__name__, adam.mu["w"].signed, adam.nu["w"].signed, adam.mu["b"].dtype.name
        ('QuantizedArray', True, False, 'float32')
        >>> grads = {"w": jnp.ones((64, 128)), "b": jnp.ones(128)}
        >>> u, state = jax.jit(tx.update)(grads, state, params)
        >>> bool(jnp.allclose(u["w"], -1e-3, rtol=1e-2))
        True
        >>> fast = quantized_state(gradtx.adamw(1e-3), code_map="float8")
        >>> fast.init(params).inner_state[0].nu["w"].code_map
        'float8'
    """

    inner: Any = option()
    min_size: int = option(4096)
    block_size: int = option(256)
    unsigned_fields: tuple = option(DEFAULT_UNSIGNED_FIELDS)
    exclude_fields: tuple = option(())
    rounding: str = option("stochastic", choices=_ROUNDINGS)
    seed: int = option(0)
    code_map: str = option("dynamic", choices=_CODE_MAPS)

    def _check(self):
        _check_member("quantized_state", self.inner, "inner")
        for name in ("min_size", "block_size", "seed"):
            value = getattr(self, name)
            low = 1 if name == "block_size" else 0
            high = 2 ** 32 - 1 if name == "seed" else None
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
                    or (high is not None and value > high):
                raise ValueError(f"quantized_state: {name}={value!r} must be an integer >= {low}"
                                 f"{f' and <= {high}' if high is not None else ''} (an option "
                                 f"fixed when the optimizer is built; defaults: min_size=4096, "
                                 f"block_size=256, seed=0).")
            object.__setattr__(self, name, int(value))
        for name in ("unsigned_fields", "exclude_fields"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            try:
                value = tuple(value)
            except TypeError:
                value = None
            if value is None or not all(isinstance(v, str) for v in value):
                raise TypeError(f"quantized_state: {name}={getattr(self, name)!r} must be a tuple "
                                f"of state field names (strings), e.g. ('nu',).")
            object.__setattr__(self, name, value)

    # -- finding the per-parameter leaves -------------------------------------------------

    def _quantize_leaf(self, x, field):
        if field in self.exclude_fields:
            return x
        if not hasattr(x, "dtype") and not hasattr(x, "shape"):
            return x
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating) or int(np.prod(jnp.shape(x))) < self.min_size:
            return x
        unsigned = field in self.unsigned_fields
        return _quantize_initial(x, signed=not unsigned, block_size=self.block_size,
                                 exclude_zero=unsigned, code_map=self.code_map)

    def _walk(self, node, ref_def, ref_shapes, field):
        # a per-parameter tree: the parameters' structure, each leaf of its parameter's shape or a
        # MaskedNode (the parameters that a masked / partition / freeze member does not see)
        leaves, treedef = jax.tree.flatten(node, is_leaf=_is_masked_node)
        if treedef == ref_def and leaves and not all(map(_is_masked_node, leaves)) and \
                all(_is_masked_node(x) or jnp.shape(x) == s for x, s in zip(leaves, ref_shapes)):
            return treedef.unflatten([x if _is_masked_node(x) else self._quantize_leaf(x, field)
                                      for x in leaves])
        if _is_named_tuple(node):
            return type(node)(*[self._walk(getattr(node, f), ref_def, ref_shapes, f)
                                for f in node._fields])
        split = _children(node)
        if split is None:
            return node
        children, level = split
        return level.unflatten([self._walk(c, ref_def, ref_shapes, field) for c in children])

    # -- the protocol -----------------------------------------------------------------------

    def init(self, params):
        inner_state = self.inner.init(params)
        ref_leaves, ref_def = jax.tree.flatten(params)
        shapes = [jnp.shape(x) for x in ref_leaves]
        stored = self._walk(inner_state, ref_def, shapes, None)
        n_quantized = sum(map(_is_quantized, jax.tree.leaves(stored, is_leaf=_is_quantized)))
        if n_quantized >= _MANY_QUANTIZED_ARRAYS:
            warnings.warn(
                f"quantized_state: {n_quantized} state arrays are quantized one by one; XLA "
                f"compiles each separately (on CPU ~0.04-0.07 s and ~4-6 MB of compiler memory "
                f"per array at 200 arrays and more per array beyond, so about "
                f"{n_quantized * 0.07 / 60:.0f} min and {n_quantized * 6 / 1024:.0f} GB for this "
                f"step). For an elementwise inner "
                f"optimizer (Adam, AdamW, Lion, SGD momentum) wrap the whole thing in "
                f"gradtx.flatten(...), which quantizes one buffer per dtype, or raise "
                f"min_size={self.min_size} to keep small leaves in float32."
                f"{_FLOAT8_COMPILES if self.code_map == 'dynamic' else ''} See "
                f"docs/quantization.md, 'Compile time and many leaves'.", stacklevel=2)
        # one random stream per quantized array, numbered by its position among the leaves
        streams = stream_numbers(jax.tree.leaves(stored, is_leaf=_is_quantized), _is_quantized)
        return QuantizedState(numerics.init_count(), stored, streams)

    def update(self, updates, state, params=None, **extra):
        count = numerics.safe_increment(state.count)
        step_words = None
        if self.rounding == "stochastic":
            # one stream per (seed, step, array): pure, reproducible, fresh every step
            step_words = key_words(jax.random.fold_in(jax.random.key(self.seed), count))
        stored, stored_def = jax.tree.flatten(state.inner_state, is_leaf=_is_quantized)
        n_quantized = sum(map(_is_quantized, stored))
        check_streams(self.name, state.streams, n_quantized, "quantized arrays")
        loaded = [dequantize_blockwise(x) if _is_quantized(x) else x for x in stored]
        inner_state = stored_def.unflatten(loaded)
        # the inner state is re-encoded below, not stored as returned: no replay (gradtx.chain);
        # and it is decoded here, not a buffer of the step: no update from the old state either
        # (gradtx.tree.map_leaves; the decoding would be read twice)
        with compiler._state_is_computed():
            updates, new_inner = call_update(self.inner, updates, inner_state, params,
                                             {**extra, NO_REPLAY: True})
        new_leaves, new_def = jax.tree.flatten(new_inner)
        old_def = jax.tree.structure(inner_state)
        if new_def != old_def:
            raise TreeMismatchError(
                f"{self.name}: the inner optimizer {self.inner!r} changed its state's structure "
                f"during update ({old_def} -> {new_def}); quantized_state needs a fixed state "
                f"structure.")
        out = []
        streams = iter(state.streams)
        for old, new in zip(stored, new_leaves):
            if _is_quantized(old):
                if jnp.shape(new) != old.shape:
                    raise TreeMismatchError(
                        f"{self.name}: a quantized state leaf changed shape from {old.shape} to "
                        f"{jnp.shape(new)} in {self.inner!r}'s update.")
                stream = next(streams)
                words = None if step_words is None else stream_words(step_words, stream)
                new = _quantize(new, old.signed, old.block_size, self.rounding, words,
                                exclude_zero=not old.signed, code_map=old.code_map)
                if new.dtype != old.dtype:
                    new = QuantizedArray(new.codes, new.absmax, old.shape, old.dtype, old.signed,
                                         old.code_map)
            out.append(new)
        return updates, QuantizedState(count, stored_def.unflatten(out), state.streams)
