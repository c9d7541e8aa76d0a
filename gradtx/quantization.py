"""8-bit block-wise quantized optimizer state (Dettmers et al., ICLR 2022; bitsandbytes).

:class:`quantized_state` wraps any optimizer and stores every large per-parameter floating state
leaf of its state (Adam's ``mu``/``nu``, Lion's ``mu``, ``trace``'s momentum, ...) as a
:class:`QuantizedArray`: one ``uint8`` code per element plus one float32 absmax scale per block of
256 elements, about 1.016 bytes per element instead of 4. The inner optimizer is not changed: the
wrapper dequantizes its state before each update and quantizes the new state after.

The array functions :func:`quantize_blockwise` / :func:`dequantize_blockwise` and the code book
:func:`dynamic_map` are public too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import numerics
from gradtx.base import Transform, option, transform
from gradtx.combine import MaskedNode, _check_member, call_update
from gradtx.tree import TreeMismatchError

__all__ = [
    "quantized_state", "QuantizedState", "QuantizedArray", "quantize_blockwise",
    "dequantize_blockwise", "dynamic_map", "DEFAULT_UNSIGNED_FIELDS",
]


# --------------------------------------------------------------------------------------------
# The dynamic (tree) quantisation map


def _build_dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of the dynamic quantisation map (see :func:`dynamic_map`)."""
    values = [0.0, 1.0]
    for k in range(7):                        # decades 1e-6 .. 1e0 (the exponent)
        scale = 10.0 ** (k - 6)
        intervals = 2 ** k if signed else 2 ** (k + 1)  # the fraction bits left over
        edges = np.linspace(0.1, 1.0, intervals + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * mids).tolist())
        if signed:
            values.extend((-scale * mids).tolist())
    table = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert table.shape == (256,) and np.all(np.diff(table) > 0)
    return table


_MAPS = {True: _build_dynamic_map(True), False: _build_dynamic_map(False)}
# decision thresholds: the midpoints between consecutive codes (nearest-code rounding)
_MIDPOINTS = {s: ((m[:-1].astype(np.float64) + m[1:]) / 2.0).astype(np.float32)
              for s, m in _MAPS.items()}
_ZERO_CODE = {s: int(np.flatnonzero(m == 0.0)[0]) for s, m in _MAPS.items()}


def _magnitude_tables(signed: bool):
    """Per-magnitude tables and per-decade constants of the arithmetic code search.

    Magnitude index ``p``: ``0`` is the value 0, decade ``k`` holds ``p`` in ``[P_k, P_k + n_k)``
    and the last index is the value 1 (``p = 128`` signed, ``255`` unsigned), with ``n_k = 2**k``,
    ``P_k = 2**k`` (signed) or ``n_k = 2**(k+1)``, ``P_k = 2**(k+1) - 1`` (unsigned). Returns the
    float32 magnitudes (``mag[p]``), the float32 decision thresholds between ``p`` and ``p + 1``
    (``thr[p]``: exactly the midpoints used by the reference search) and per decade ``k`` the
    constants ``D_k, C_k`` of the continuous position ``a * D_k + C_k``, which equals ``p`` at the
    map value ``p`` and ``p + 1/2`` half-way between two values of the same decade.
    """
    table = _MAPS[signed]
    mids = _MIDPOINTS[signed]
    if signed:
        # the map is symmetric apart from +1, so negative values use the positive magnitudes
        assert np.array_equal(-table[:127][::-1], table[128:255])
        assert np.array_equal(-mids[:127][::-1], mids[127:254])
        mag, thr = table[127:], mids[127:]
    else:
        mag, thr = table, mids
    d, c = [], []
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        first = n if signed else n - 1
        d.append(10.0 ** (6 - k) * n / 0.9)
        c.append(first - 0.1 * n / 0.9 - 0.5)
    return (mag.astype(np.float32), thr.astype(np.float32), np.asarray(d, np.float32),
            np.asarray(c, np.float32))


_TABLES = {True: _magnitude_tables(True), False: _magnitude_tables(False)}
# decade k of a magnitude a: a >= _DECADE_START[k - 1] (10**(k-7)); any nearby boundary works (the
# position estimate is continuous across decades to within the rounding the search corrects)
_DECADE_START = [np.float32(10.0 ** (k - 7)) for k in range(1, 7)]


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic quantisation map of 8-bit optimizers, as a sorted float32 numpy array.

    Dettmers et al.'s *dynamic tree* quantisation: a code is a sign (signed map only), an exponent
    written as a run of leading zero bits, an indicator bit, and a linear fraction in the remaining
    bits. Equivalently, the map holds, for each decade ``10**(k-6)``, ``k = 0..6``, the midpoints
    of ``n_k`` equal intervals of ``[0.1, 1]`` times ``10**(k-6)``, with ``n_k = 2**k`` (signed,
    each with both signs) or ``2**(k+1)`` (unsigned: the sign bit becomes one more fraction bit);
    plus ``0`` and ``1``. So small magnitudes get coarse relative steps from far fewer codes and
    large ones are resolved finely: the relative spacing near 1 is ``0.9/64`` (signed) and
    ``0.9/128`` (unsigned), and the smallest non-zero magnitude is ``0.55e-6``.

    The signed map spans ``[-0.99297, 1]`` (there is no code for ``-1``: a block's most negative
    value, when it sets the absmax, is stored as ``-0.99297·absmax``) and the unsigned map
    ``[0, 1]``. The same construction as bitsandbytes' ``create_dynamic_map`` (its defaults).

    Example:
        >>> from gradtx.quantization import dynamic_map
        >>> m = dynamic_map(signed=False)
        >>> m.shape, float(m[0]), float(m[-1]), bool((m[1:] > m[:-1]).all())
        ((256,), 0.0, 1.0, True)
    """
    return _MAPS[bool(signed)].copy()


# --------------------------------------------------------------------------------------------
# QuantizedArray


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """An array stored as 8-bit block-wise quantized codes (a pytree).

    Children (the only arrays, what checkpoints and ``jax.tree.leaves`` see): ``codes``, ``uint8``
    of shape ``(n_blocks, block_size)`` (the flattened array, zero-padded to whole blocks), and
    ``absmax``, float32 of shape ``(n_blocks,)``. Static auxiliary data: the original ``shape``,
    the original ``dtype`` (name) and whether the ``signed`` or unsigned :func:`dynamic_map` is used.
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

    __slots__ = ("codes", "absmax", "shape", "dtype", "signed")

    def __init__(self, codes, absmax, shape: tuple, dtype: str, signed: bool):
        self.codes = codes
        self.absmax = absmax
        self.shape = tuple(int(d) for d in shape)
        self.dtype = str(dtype)
        self.signed = bool(signed)

    @property
    def block_size(self) -> int:
        return int(np.shape(self.codes)[-1])

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def tree_flatten(self):
        return (self.codes, self.absmax), (self.shape, self.dtype, self.signed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.codes, obj.absmax = children
        obj.shape, obj.dtype, obj.signed = aux
        return obj

    def __repr__(self) -> str:
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, signed={self.signed}, "
                f"block_size={np.shape(self.codes)[-1] if self.codes is not None else '?'})")


_ROUNDINGS = ("nearest", "stochastic")


def _floor_position(a, signed: bool):
    """``floor(a * D_k + C_k)`` for magnitudes ``a`` in ``[0, 1]`` (float32): an estimate of the
    magnitude index of the largest map value ``<= a`` that is exact except within a few float32
    rounding errors of a map value, where it may be one too high or too low. The decade ``k`` is
    picked with six comparisons and selects (no table lookup)."""
    _, _, d_k, c_k = _TABLES[signed]
    d = jnp.full(jnp.shape(a), d_k[0], jnp.float32)
    c = jnp.full(jnp.shape(a), c_k[0], jnp.float32)
    for k, start in enumerate(_DECADE_START, 1):
        above = a >= start
        d = jnp.where(above, d_k[k], d)
        c = jnp.where(above, c_k[k], c)
    return jnp.floor(a * d + c)


def _clipped_index(f, top):
    """``f`` (float32 from :func:`_floor_position`) clipped to ``[0, top]`` as int32; NaN -> 0."""
    return jnp.minimum(jnp.where(f > 0, f, jnp.float32(0)), top).astype(jnp.int32)


def _magnitude_and_limit(y, signed: bool):
    if signed:
        positive = y >= 0
        # -1 has no code: the most negative magnitude is index 127, +1 is index 128
        return jnp.abs(y), positive, jnp.where(positive, jnp.float32(127), jnp.float32(126))
    return jnp.maximum(y, jnp.float32(0)), None, jnp.float32(254)


def _to_code(p, positive, signed: bool):
    if signed:
        return jnp.where(positive, 127 + p, 127 - p).astype(jnp.uint8)
    return p.astype(jnp.uint8)


def _nearest_codes(y, signed: bool):
    """Codes of the map values nearest to ``y`` (float32 in ``[-1, 1]``), ties to the lower code:
    bit-for-bit ``searchsorted(midpoints, y, side="left")``, without the binary search. The
    position estimate gives the lower of the two candidate codes exactly (it is only unsure next to
    a map value, where both candidate pairs contain that value), and one comparison with the exact
    float32 midpoint between the candidates decides."""
    _, thr, _, _ = _TABLES[signed]
    a, positive, top = _magnitude_and_limit(y, signed)
    f = _clipped_index(_floor_position(a, signed), top)
    t = jnp.asarray(thr)[f]
    if signed:
        # a tie goes to the lower code: the smaller magnitude for y > 0, the larger for y < 0
        up = jnp.where(positive, a > t, a >= t)
    else:
        up = a > t
    return _to_code(f + up.astype(jnp.int32), positive, signed)


def _stochastic_codes(y, signed: bool, u):
    """Stochastic rounding of ``y`` between its two neighbouring map values ``lo <= |y| <= hi``:
    up with probability ``(|y| - lo) / (hi - lo)`` (``u`` uniform in ``[0, 1)``, one per element).
    Next to a map value the estimate may name the pair on the other side of it; the probability
    then falls just outside ``[0, 1]`` and the value itself is chosen (an error of a few float32
    roundings, far below the code spacing)."""
    mag, _, _, _ = _TABLES[signed]
    a, positive, top = _magnitude_and_limit(y, signed)
    f = _clipped_index(_floor_position(a, signed), top)
    table = jnp.asarray(mag)
    lo, hi = table[f], table[f + 1]
    up = u * (hi - lo) < a - lo
    return _to_code(f + up.astype(jnp.int32), positive, signed)


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _key_words(key):
    """Two 32-bit words drawn from ``key`` (one Threefry evaluation, a scalar computation)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def _leaf_words(words, position: int):
    """Words for the leaf at ``position`` from a step's words: two scalar hashes, not another
    Threefry evaluation per leaf (whose unrolled rounds dominated the compile time of a state
    with hundreds of leaves)."""
    a = np.uint32((position * 0x9E3779B1 + 1) % 2**32)     # Python ints: no numpy overflow
    b = np.uint32((position * 0x85EBCA6B) % 2**32)
    return jnp.stack([_fmix32(words[0] ^ a), _fmix32(words[1] + b)])


def _uniforms(words, shape):
    """One float32 in ``[0, 1)`` (24 random bits) per element of a ``(n_blocks, block_size)`` array.

    Each element's number is a hash of its flat index and two 32-bit ``words``. Counter-based, so
    it is cheap (a few integer operations per element instead of a Threefry evaluation), splits
    with sharding like any elementwise function of ``iota``, and is identical under jit and
    eagerly.
    """
    rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
    index = rows * np.uint32(shape[1]) + cols
    h = _fmix32((index ^ words[1]) * np.uint32(0x9E3779B1) + words[0])
    return (h >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def quantize_blockwise(x, *, signed: bool = True, block_size: int = 256,
                       rounding: str = "nearest", key=None) -> QuantizedArray:
    """Quantize ``x`` to 8-bit codes with one float32 absmax scale per block of ``block_size``.

    ``x`` is flattened and zero-padded to whole blocks. For each block ``b``,
    ``absmax_b = max |x_i|`` (float32) and ``y_i = x_i / absmax_b`` is coded with the
    :func:`dynamic_map`:

    * ``rounding="nearest"`` (default): the code of the map value nearest to ``y_i``, ties to the
      lower code -- bit-for-bit ``searchsorted(midpoints, y, side="left")`` over the 255 float32
      midpoints between consecutive map values, computed without a binary search: the decade of
      ``|y|`` from six comparisons, the position inside it from the decade's linear spacing, then
      one comparison with the exact midpoint between the two candidate codes (checked against the
      search for every float32 in ``[-1, 1]``).
    * ``rounding="stochastic"``: between the neighbouring map values ``a <= y_i <= b``, ``b`` with
      probability ``(y_i - a) / (b - a)`` and ``a`` otherwise, so that
      ``E[dequantize(quantize(x))] = x`` (unbiased, up to 2**-24 of the code spacing from the
      24-bit uniforms; the one exception is a block's most negative value when it sets the
      absmax: the signed map has no ``-1`` and it is stored as ``-0.99297·absmax``, as with
      nearest rounding). Needs ``key`` (a :func:`jax.random.key` or ``PRNGKey``); the same key
      gives the same codes.

    With the unsigned map negative values clip to code ``0`` (value 0): use it only for
    non-negative data (second moments). Everything is jnp code: jit/vmap/grad-safe, no host work.

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
    words = _key_words(key) if rounding == "stochastic" else None
    return _quantize(x, signed, block_size, rounding, words)


def _quantize(x, signed: bool, block_size: int, rounding: str, words) -> QuantizedArray:
    """:func:`quantize_blockwise` with the stochastic stream given as two uint32 ``words``."""
    x = jnp.asarray(x)
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
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # a NaN or an infinity in a block: store a NaN scale, so the whole block reads back as NaN
    absmax = jnp.where(jnp.isfinite(absmax), absmax, jnp.float32(jnp.nan))
    safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    normed = blocks / safe[:, None]
    if rounding == "nearest":
        codes = _nearest_codes(normed, bool(signed))
    else:
        codes = _stochastic_codes(normed, bool(signed), _uniforms(words, blocks.shape))
    return QuantizedArray(codes, absmax, shape, jnp.dtype(dtype).name, signed)


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
    """The array a :class:`QuantizedArray` stands for: ``map[code] * absmax``, in its dtype.

    A table lookup and one multiply per element, computed in float32 and cast to the original
    dtype and shape. bitsandbytes: ``bitsandbytes.functional.dequantize_blockwise``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx.quantization import quantize_blockwise, dequantize_blockwise
        >>> x = jnp.linspace(-1.0, 1.0, 1000)
        >>> y = dequantize_blockwise(quantize_blockwise(x))
        >>> y.shape, bool(jnp.max(jnp.abs(y - x)) < 0.0075)
        ((1000,), True)
    """
    table = jnp.asarray(_MAPS[q.signed])
    values = table[q.codes.astype(jnp.int32)] * q.absmax.astype(jnp.float32)[:, None]
    n = q.size
    return values.reshape(-1)[:n].reshape(q.shape).astype(q.dtype)


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
    """

    count: Any
    inner_state: Any


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

    Inside :func:`gradtx.masked`, :func:`gradtx.partition` and :func:`gradtx.freeze`, where a
    per-parameter tree holds ``MaskedNode()`` for the parameters its member does not see, the
    other leaves are quantized and the ``MaskedNode`` kept.

    **Rounding** (``rounding``, default ``"stochastic"``). ``"nearest"`` stores the code nearest
    to each new value. ``"stochastic"`` rounds up or down at random with the probabilities that
    make the stored value unbiased (:func:`quantize_blockwise`). An EMA whose per-step increment
    ``(1-β)·g`` is below half a code step (``0.7%`` of the block's absmax near the top of the
    signed map) never moves under nearest rounding; unbiased rounding lets such increments
    accumulate in expectation. Measured (tests/test_quantization.py, benchmarks/quantized.py):
    on a noiseless full-batch MLP, final loss quantized/float32 with nearest rounding Lion 1.59,
    LAMB 1.09, AdamW 0.975; with stochastic rounding 0.993, 1.011, 1.003. Stochastic is therefore
    the default; it costs one hash per element. The random numbers are a pure function of
    ``(seed, step count, leaf position, element index)``: two runs give identical results, a
    restored checkpoint continues identically, and ``jit``/``vmap``/``eval_shape`` need nothing
    extra. ``seed`` (an integer option) picks another stream.

    **Memory.** An element costs ``1 + 4/block_size`` bytes (plus padding to whole blocks):
    Adam's two moments ≈ 2.03 bytes per parameter instead of 8 (0.254×).

    Defaults follow Dettmers et al. 2022 / bitsandbytes (``bnb.optim.Adam8bit`` and friends):
    ``block_size=256``, ``min_size=4096`` (bitsandbytes' ``min_8bit_size``), the dynamic map.
    Differences from bitsandbytes: this is a wrapper around any optimizer rather than a fused
    kernel per optimizer, so the update is computed in float32 from dequantized moments (the
    same math) but without bitsandbytes' percentile clipping or stable-embedding options; XLA
    fuses the dequantize / update / quantize passes as it can, which on CPU is several times
    slower than a float32 step (see docs/quantization.md). Optax has no equivalent.

    **State:** :class:`QuantizedState` ``(count, inner_state)``. ``min_size``, ``block_size``,
    the field tuples, ``rounding`` and ``seed`` are options (not hyperparameters that
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
    """

    inner: Any = option()
    min_size: int = option(4096)
    block_size: int = option(256)
    unsigned_fields: tuple = option(DEFAULT_UNSIGNED_FIELDS)
    exclude_fields: tuple = option(())
    rounding: str = option("stochastic", choices=_ROUNDINGS)
    seed: int = option(0)

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
        # the inner state is usually a constant (zeros) at init: the barrier keeps XLA from
        # constant-folding the whole quantisation at compile time (seconds for a 16M leaf)
        return quantize_blockwise(jax.lax.optimization_barrier(x),
                                  signed=field not in self.unsigned_fields,
                                  block_size=self.block_size)

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
        return QuantizedState(numerics.init_count(),
                              self._walk(inner_state, ref_def, shapes, None))

    def update(self, updates, state, params=None, **extra):
        count = numerics.safe_increment(state.count)
        step_words = None
        if self.rounding == "stochastic":
            # one stream per (seed, step, leaf position): pure, reproducible, fresh every step
            step_words = _key_words(jax.random.fold_in(jax.random.key(self.seed), count))
        stored, stored_def = jax.tree.flatten(state.inner_state, is_leaf=_is_quantized)
        loaded = [dequantize_blockwise(x) if _is_quantized(x) else x for x in stored]
        inner_state = stored_def.unflatten(loaded)
        updates, new_inner = call_update(self.inner, updates, inner_state, params, extra)
        new_leaves, new_def = jax.tree.flatten(new_inner)
        old_def = jax.tree.structure(inner_state)
        if new_def != old_def:
            raise TreeMismatchError(
                f"{self.name}: the inner optimizer {self.inner!r} changed its state's structure "
                f"during update ({old_def} -> {new_def}); quantized_state needs a fixed state "
                f"structure.")
        out = []
        for position, (old, new) in enumerate(zip(stored, new_leaves)):
            if _is_quantized(old):
                if jnp.shape(new) != old.shape:
                    raise TreeMismatchError(
                        f"{self.name}: a quantized state leaf changed shape from {old.shape} to "
                        f"{jnp.shape(new)} in {self.inner!r}'s update.")
                words = None if step_words is None else _leaf_words(step_words, position)
                new = _quantize(new, old.signed, old.block_size, self.rounding, words)
                if new.dtype != old.dtype:
                    new = QuantizedArray(new.codes, new.absmax, old.shape, old.dtype, old.signed)
            out.append(new)
        return updates, QuantizedState(count, stored_def.unflatten(out))
