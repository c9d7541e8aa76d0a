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

from gradtx.base import Transform, option, transform
from gradtx.combine import _check_member, call_update
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


def quantize_blockwise(x, *, signed: bool = True, block_size: int = 256) -> QuantizedArray:
    """Quantize ``x`` to 8-bit codes with one float32 absmax scale per block of ``block_size``.

    ``x`` is flattened and zero-padded to whole blocks. For each block ``b``,
    ``absmax_b = max |x_i|`` (float32), and each element gets the code of the :func:`dynamic_map`
    value nearest to ``x_i / absmax_b`` (round to nearest via a binary search over the midpoints
    between codes). With the unsigned map negative values clip to code ``0`` (value 0): use it only
    for non-negative data (second moments). Everything is jnp code: jit/vmap/grad-safe, no host
    work.

    **Error.** ``|dequantize(quantize(x)) - x| <= h · absmax_b`` element-wise, where ``h`` is half
    the largest gap between consecutive map values: ``h ≈ 0.0071`` (signed), ``0.0036``
    (unsigned); zeros stay exactly zero, and an all-zero block is stored with ``absmax = 0`` and
    dequantizes to zeros. **Non-finite values:** a NaN or ±Inf makes its block's absmax non-finite
    and the whole block dequantizes to NaN (other blocks are unaffected), the same way a NaN
    gradient poisons a float32 moment.

    bitsandbytes: ``bitsandbytes.functional.quantize_blockwise(x, blocksize=256)`` with the default
    dynamic map (same scheme; bitsandbytes quantizes on GPU with its own rounding kernel).

    Example:
        >>> import jax.numpy as jnp
        >>> from gradtx.quantization import quantize_blockwise, dequantize_blockwise
        >>> q = quantize_blockwise(jnp.array([1.0, -0.5, 0.0, 2.0]), block_size=2)
        >>> q.codes.dtype.name, q.absmax.tolist()
        ('uint8', [1.0, 2.0])
        >>> [round(v, 2) for v in dequantize_blockwise(q).tolist()]
        [1.0, -0.5, 0.0, 2.0]
    """
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"quantize_blockwise: block_size={block_size} must be a positive "
                         f"integer (bitsandbytes uses 256).")
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
    mids = jnp.asarray(_MIDPOINTS[bool(signed)])
    codes = jnp.searchsorted(mids, normed, side="left").astype(jnp.uint8)
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
    """State of :class:`quantized_state`: the inner optimizer's state with its large per-parameter
    floating leaves replaced by :class:`QuantizedArray` values (the rest unchanged)."""

    inner_state: Any


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

    Per-parameter trees that do not have exactly the parameters' structure — e.g. the state of
    :func:`gradtx.masked` (``MaskedNode`` stands in for masked-out leaves) — are left unquantized.

    **Memory.** An element costs ``1 + 4/block_size`` bytes (plus padding to whole blocks):
    Adam's two moments ≈ 2.03 bytes per parameter instead of 8 (0.254×).

    Defaults follow Dettmers et al. 2022 / bitsandbytes (``bnb.optim.Adam8bit`` and friends):
    ``block_size=256``, ``min_size=4096`` (bitsandbytes' ``min_8bit_size``), the dynamic map.
    Differences from bitsandbytes: this is a wrapper around any optimizer rather than a fused
    kernel per optimizer, so the update is computed in float32 from dequantized moments (the
    same math) but without bitsandbytes' percentile clipping or stable-embedding options; the
    quantisation uses round-to-nearest. Optax has no equivalent.

    ``min_size``, ``block_size`` and the field tuples fix the state's structure, so they are
    options (not hyperparameters that :func:`gradtx.inject_hyperparams` could trace).

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

    def _check(self):
        _check_member("quantized_state", self.inner, "inner")
        for name in ("min_size", "block_size"):
            value = getattr(self, name)
            low = 1 if name == "block_size" else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"quantized_state: {name}={value!r} must be an integer >= {low} "
                                 f"(it fixes the state's structure; defaults: min_size=4096, "
                                 f"block_size=256).")
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
        return quantize_blockwise(x, signed=field not in self.unsigned_fields,
                                  block_size=self.block_size)

    def _walk(self, node, ref_def, ref_shapes, field):
        leaves, treedef = jax.tree.flatten(node)
        if treedef == ref_def and leaves and \
                all(jnp.shape(x) == s for x, s in zip(leaves, ref_shapes)):
            return treedef.unflatten([self._quantize_leaf(x, field) for x in leaves])
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
        return QuantizedState(self._walk(inner_state, ref_def, shapes, None))

    def update(self, updates, state, params=None, **extra):
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
        for old, new in zip(stored, new_leaves):
            if _is_quantized(old):
                if jnp.shape(new) != old.shape:
                    raise TreeMismatchError(
                        f"{self.name}: a quantized state leaf changed shape from {old.shape} to "
                        f"{jnp.shape(new)} in {self.inner!r}'s update.")
                new = quantize_blockwise(new, signed=old.signed, block_size=old.block_size)
                if new.dtype != old.dtype:
                    new = QuantizedArray(new.codes, new.absmax, old.shape, old.dtype, old.signed)
            out.append(new)
        return updates, QuantizedState(stored_def.unflatten(out))
