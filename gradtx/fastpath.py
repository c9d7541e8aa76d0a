"""A flattened fast path for many-leaf models: run an elementwise optimizer on one buffer per dtype.

An optimizer step over a tree of ``n`` leaves compiles to ``O(n)`` loops and keeps ``O(n)`` state
arrays: with thousands of small leaves, XLA's compile time and the per-leaf dispatch of the step
dominate, not the arithmetic. :class:`flatten` wraps any *elementwise* transform (or chain) so that
it runs on the concatenation of all leaves of each dtype instead::

    flat grads   = {dtype: concatenate([ravel(g) for every leaf g of that dtype])}
    flat params  = the same for the parameters (when ``update`` is given params)
    flat updates, inner_state = inner.update(flat grads, inner_state, flat params)
    updates      = flat updates split back into the tree (slices + reshapes)

The inner state is kept flat: its moments are one 1-D array per dtype (``{"float32": ...,
"bfloat16": ...}``), so the optimizer state has ``O(#dtypes)`` arrays instead of ``O(#leaves)``,
plus one int32 scalar per leaf, the position where the leaf starts in its dtype's buffer
(:class:`FlattenState`). The split cuts each leaf's piece out at that run-time position rather than
at a constant one, because XLA's CPU compiler compiles every *distinct* fused computation on its
own: with constant positions every leaf's parameter update was a computation of its own, and
1,000 leaves of 64×64 compiled in ~12 s; read from the state, the positions leave the updates of
same-shaped leaves one shared computation (~2 s, about a third of the plain tree step's compile
time). Passing those scalars into the step costs ~2-3 µs each per step on CPU.
The parameters and gradients are still trees at the jit boundary (passing ``n`` arrays into the
compiled step still costs per leaf), and the concatenation and the split are extra passes over the
gradients (and the parameters, for transforms that read them) that XLA fuses into neighbouring loops
where it can.

**Which inner transforms are valid.** Exactly those whose update treats every element
independently, with at most *global* reductions over the whole tree: ``sgd`` (momentum, Nesterov),
``adam``/``adamw``/``nadam``/``amsgrad``/``adamax``/``radam``, ``adabelief``, ``lion``, ``sign_sgd``,
``rmsprop``, ``adagrad``, ``adadelta``, ``clip``, ``clip_by_global_norm`` (the global norm of the
concatenation is the tree's global norm), schedules, :func:`gradtx.inject_hyperparams`,
:func:`gradtx.skip_nonfinite`, :func:`gradtx.accumulate_gradients`. For these the updates perform
the same floating-point operations on the same values as the plain path: bit-identical when run
op by op; under ``jit`` XLA fuses the two programs differently and results may differ in the last
bit (``clip_by_global_norm`` also sums in another order). Transforms
that need each leaf's shape or norm -- LAMB/LARS (:class:`gradtx.scale_by_trust_ratio`), Adafactor
(:class:`gradtx.scale_by_factored_rms`), :class:`gradtx.scale_by_param_block_rms`,
:class:`gradtx.clip_by_block_rms`, :class:`gradtx.adaptive_grad_clip` -- are rejected when the
wrapper is built, as are masks and labels (``mask=`` of weight decay, :func:`gradtx.masked`,
:func:`gradtx.partition`, :func:`gradtx.freeze`) other than a single ``True``/``False`` for the
whole tree: a mask describes the parameter tree, which the inner transform no longer sees. To
decay only some parameters, put the flattening *inside* the partition, one flat group per label::

    gradtx.partition({"decay": gradtx.flatten(gradtx.adamw(1e-3, weight_decay=0.1)),
                      "no_decay": gradtx.flatten(gradtx.adam(1e-3))}, labels)

Foreign (Optax) inner transforms cannot be inspected; they must be elementwise too. Wrappers that
keep copies of the parameters in their state (:func:`gradtx.ema_params`, :func:`gradtx.swa`) keep
them flat, so :func:`gradtx.averaged_params` returns the flat dict.

Updates must have their parameters' dtypes (the usual case); the leaves are grouped by dtype in the
order of ``jax.tree.leaves``, in ``init`` from the parameters and in ``update`` from the updates.
Optax's ``optax.flatten`` is similar but ravels everything into a single buffer (promoting mixed
dtypes to one) and does not check that the inner transform is elementwise; torch's ``fused``/``foreach`` optimizers get a similar effect from
multi-tensor kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transform, option, transform
from gradtx.combine import FrozenTree, _check_member, _is_transform_like, call_update
from gradtx.tree import TreeMismatchError, first_difference, keystr
from gradtx.transforms.clipping import adaptive_grad_clip, clip_by_block_rms
from gradtx.transforms.factored import scale_by_factored_rms, scale_by_param_block_rms
from gradtx.transforms.trust_ratio import scale_by_trust_ratio

__all__ = ["flatten", "FlattenState"]

_PER_LEAF = (scale_by_trust_ratio, scale_by_factored_rms, scale_by_param_block_rms,
             clip_by_block_rms, adaptive_grad_clip)
_TREE_SPEC_FIELDS = ("mask", "labels")


class FlattenState(NamedTuple):
    """State of :class:`flatten`.

    ``inner_state``: the inner transform's state over the flat per-dtype buffers. ``offsets``: one
    int32 scalar per parameter leaf (in the order of ``jax.tree.leaves``), the position where the
    leaf starts in its dtype's buffer, set by ``init``; ``None`` for the leaves of a dtype whose
    buffer has more elements than int32 can index (those are cut at constant positions). The
    update cuts each leaf's piece out at this run-time position: XLA's CPU compiler compiles
    every *distinct* fused computation on its own (~10 ms each), and a piece cut at a constant
    position makes every leaf's parameter update distinct, while pieces cut at positions read
    from buffers share one computation (``flatten(adamw)`` over 1,000 leaves of 64×64 compiles
    in ~2 s instead of ~10 s).
    """

    inner_state: Any
    offsets: Any


def _is_whole_tree_spec(value) -> bool:
    """A mask/label spec that is one value for the whole tree (so it means the same when flat)."""
    if value is None or isinstance(value, bool):
        return True
    return (isinstance(value, FrozenTree) and jax.tree_util.treedef_is_leaf(value.treedef)
            and len(value.leaves) == 1)


def _check_elementwise(tx, where: str) -> None:
    """Reject transforms (anywhere inside ``tx``) that need the tree's per-leaf structure."""
    if isinstance(tx, _PER_LEAF):
        raise ValueError(
            f"flatten: {where} is {tx!r}, which computes per-leaf norms or statistics; on the "
            f"flat per-dtype buffers it would treat the whole model as one leaf and compute a "
            f"different update. Use it without gradtx.flatten (or flatten only the elementwise "
            f"part of the optimizer).")
    if not (isinstance(tx, Transform) and dataclasses.is_dataclass(tx)):
        return
    for f in dataclasses.fields(tx):
        value = getattr(tx, f.name)
        if f.name in _TREE_SPEC_FIELDS and not _is_whole_tree_spec(value):
            raise ValueError(
                f"flatten: {where} is {tx!r}, whose {f.name} describes the parameter tree; inside "
                f"gradtx.flatten the inner transform sees one flat buffer per dtype, not the tree. "
                f"Put gradtx.flatten inside the mask/partition instead, e.g. "
                f"gradtx.partition({{'decay': gradtx.flatten(...), 'rest': gradtx.flatten(...)}}, "
                f"labels).")
        if _is_transform_like(value) and not isinstance(value, type):
            _check_elementwise(value, f"{where}.{f.name}")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if _is_transform_like(item) and not isinstance(item, type):
                    _check_elementwise(item, f"{where}.{f.name}[{i}]")
                elif (isinstance(item, tuple) and len(item) == 2 and _is_transform_like(item[1])
                      and not isinstance(item[1], type)):
                    _check_elementwise(item[1], f"{where}.{f.name}[{item[0]!r}]")


def _dtype_name(leaf) -> str:
    return jnp.dtype(jnp.result_type(leaf)).name


def _group(leaves) -> dict:
    """``{dtype name: [leaf index, ...]}`` in order of first appearance, indices in tree order."""
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(_dtype_name(leaf), []).append(i)
    return groups


def _size(leaf) -> int:
    return math.prod(jnp.shape(leaf))


def _concat(leaves, groups) -> dict:
    """One 1-D buffer per dtype group (abstract leaves give an abstract buffer)."""
    flat = {}
    for name, idx in groups.items():
        parts = [leaves[i] for i in idx]
        if all(isinstance(p, jax.ShapeDtypeStruct) for p in parts):
            flat[name] = jax.ShapeDtypeStruct((sum(_size(p) for p in parts),), jnp.dtype(name))
            continue
        flat[name] = _ravel_and_join([jnp.asarray(p) for p in parts])
    return flat


_MAX_INDEXED = int(jnp.iinfo(jnp.int32).max)


def _starts(leaves, groups) -> list:
    """Each leaf's start in its dtype's buffer (``None`` in a buffer too long for int32
    positions), in the order of ``leaves``."""
    starts = [None] * len(leaves)
    for idx in groups.values():
        indexed = sum(_size(leaves[i]) for i in idx) <= _MAX_INDEXED
        start = 0
        for i in idx:
            starts[i] = start if indexed else None
            start += _size(leaves[i])
    return starts


@functools.partial(jax.jit, static_argnums=2)
def _split(buf, offsets, shapes):
    """``buf`` (1-D) cut into consecutive pieces of the given ``shapes``, each starting at its
    entry of ``offsets`` (a run-time int32 scalar; ``None``: the position the shapes before it
    give, as a constant): the inverse of :func:`_ravel_and_join`, jitted for the same reason."""
    pieces, start = [], 0
    for offset, shape in zip(offsets, shapes):
        n = math.prod(shape)
        if offset is None:
            piece = jax.lax.slice_in_dim(buf, start, start + n)
        else:
            piece = jax.lax.dynamic_slice_in_dim(buf, offset, n, allow_negative_indices=False)
        pieces.append(jnp.reshape(piece, shape))
        start += n
    return pieces


@jax.jit
def _ravel_and_join(parts):
    """The 1-D concatenation of ``parts``. Jitted: outside ``jit`` (``init``, an eager ``update``)
    it is one compiled program per list of shapes, where op by op every reshape compiled anew for
    each new leaf shape (200 differently shaped leaves: 3.5 s); inside ``jit`` it is inlined."""
    raveled = [jnp.reshape(p, (-1,)) for p in parts]
    return raveled[0] if len(raveled) == 1 else jnp.concatenate(raveled)


@transform
class flatten(Transform):
    """Run an elementwise ``inner`` transform on one concatenated 1-D buffer per dtype.

    ``flatten(inner)`` has the math of ``inner`` -- for elementwise transforms the same operations
    on the same values (bit-identical op by op, within the last bit under ``jit``) -- but its state
    holds one array per dtype (per moment) instead of one per parameter leaf (and one int32
    position scalar per leaf): a third of the fusions. Measured on a 2-core CPU (AdamW, 64×64
    leaves, ``benchmarks/RESULTS-leaves-8bit.md``, Optax's AdamW in the same run): trace + compile
    0.36x Optax's at 1,000 and 3,000 leaves (1.9 s and 10.3 s; the plain tree path is on par with
    Optax), and 8-bit state ``flatten(quantized_state(adamw))`` 2.0 s and 10.5 s (the per-leaf
    8-bit path ran out of 24 GB of compiler memory at 1,000 leaves). The step is no faster than
    the plain tree path's (0.90-0.96x Optax's; the plain path 0.94-0.99x): passing each parameter,
    gradient and position into the compiled step costs more than the loops it saves, and the
    position scalars add ~2-3 µs per leaf (A/B at 1,000 leaves: 19.9 ms against 17.7 with
    constant positions, which compiled in 9.8 s instead of 2.0). On big leaves the concatenation
    and the split cost more than they save.
    ``inner`` must be elementwise (see :mod:`gradtx.fastpath`): per-leaf-norm transforms (LAMB,
    LARS, Adafactor, block-RMS clipping, AGC) and tree masks/labels inside ``inner`` raise
    ``ValueError`` here. State: :class:`FlattenState` ``(inner_state, offsets)``, where
    ``inner_state`` is ``inner``'s state over ``{dtype name: 1-D buffer}``. Extra ``update``
    keyword arguments are forwarded to ``inner``. Optax: ``optax.flatten`` is the closest (one
    buffer for all dtypes); torch: the multi-tensor (``foreach``/``fused``) optimizers.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(3, jnp.bfloat16)}
        >>> from gradtx.fastpath import flatten
        >>> tx = flatten(gradtx.adam(0.5))
        >>> state = tx.init(params)
        >>> jax.tree.map(jnp.shape, state.inner_state[0].mu)
        {'bfloat16': (3,), 'float32': (4,)}
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["w"].tolist(), updates["b"].dtype
        ([[-0.5, -0.5], [-0.5, -0.5]], dtype(bfloat16))
        >>> plain = gradtx.adam(0.5)
        >>> expected, _ = plain.update(grads, plain.init(params), params)
        >>> all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(updates),
        ...                                          jax.tree.leaves(expected)))
        True
    """

    inner: Any = option()

    def _check(self):
        _check_member("flatten", self.inner, "inner")
        _check_elementwise(self.inner, "inner")

    def __repr__(self):
        return f"flatten({self.inner!r})"

    def init(self, params):
        leaves = jax.tree.leaves(params)
        groups = _group(leaves)
        offsets = tuple(None if start is None else jnp.asarray(start, jnp.int32)
                        for start in _starts(leaves, groups))
        return FlattenState(self.inner.init(_concat(leaves, groups)), offsets)

    def _check_offsets(self, offsets, leaves, groups) -> None:
        """``offsets`` must be what ``init`` gives for these leaves: a tuple with one entry per
        leaf, an int32 scalar or, in a buffer too long for int32 positions, ``None``."""
        expected = _starts(leaves, groups)
        if (isinstance(offsets, tuple) and len(offsets) == len(expected)
                and all((o is None) == (e is None) for o, e in zip(offsets, expected))
                and all(jnp.shape(o) == () and jnp.result_type(o) == jnp.int32
                        for o in offsets if o is not None)):
            return
        if not isinstance(offsets, tuple):
            held = f"a {type(offsets).__name__}"
        elif len(offsets) != len(expected):
            held = f"{len(offsets)} entries"
        else:
            held = "an entry that is not an int32 scalar (or a misplaced None)"
        raise TreeMismatchError(
            f"flatten: state.offsets holds {held} for {len(leaves)} parameter leaves; it must be "
            f"a tuple of one int32 scalar per leaf (each leaf's start in its dtype's buffer), as "
            f"flatten.init builds it. Build the state with init of the same parameters (a "
            f"state saved before offsets existed lacks them: take them from a fresh init).")

    def update(self, updates, state, params=None, **extra):
        leaves, treedef = jax.tree.flatten(updates)
        groups = _group(leaves)
        flat_params = None
        if params is not None:
            param_leaves, param_def = jax.tree.flatten(params)
            if param_def != treedef:
                raise TreeMismatchError(
                    f"flatten: the updates do not have the structure of the params "
                    f"({first_difference(updates, params)}); pass the parameters the gradients "
                    f"were computed for.")
            for i, (u, p) in enumerate(zip(leaves, param_leaves)):
                if _dtype_name(u) != _dtype_name(p):
                    path = keystr(jax.tree_util.tree_flatten_with_path(updates)[0][i][0])
                    raise TypeError(
                        f"flatten: the update at {path} has dtype {_dtype_name(u)} but its "
                        f"parameter has dtype {_dtype_name(p)}; flatten groups leaves by dtype and "
                        f"needs updates in their parameters' dtypes (cast the gradients first).")
            flat_params = _concat(param_leaves, groups)
        self._check_offsets(state.offsets, leaves, groups)
        flat_updates, inner_state = call_update(self.inner, _concat(leaves, groups),
                                                state.inner_state, flat_params, extra)
        if not isinstance(flat_updates, dict) or set(flat_updates) != set(groups):
            raise TreeMismatchError(
                f"flatten: {self.inner!r} returned updates that are not one buffer per dtype "
                f"({sorted(groups)}); the inner transform must be elementwise.")
        out = [None] * len(leaves)
        for name, idx in groups.items():
            buf = flat_updates[name]
            total = sum(_size(leaves[i]) for i in idx)
            if jnp.shape(buf) != (total,):
                raise TreeMismatchError(
                    f"flatten: the {name} updates have {total} elements in total but the inner "
                    f"transform returned a buffer of shape {jnp.shape(buf)}; was the state "
                    f"initialised with different parameters?")
            pieces = _split(buf, tuple(state.offsets[i] for i in idx),
                            tuple(tuple(jnp.shape(leaves[i])) for i in idx))
            for i, piece in zip(idx, pieces):
                out[i] = piece
        return treedef.unflatten(out), FlattenState(inner_state, state.offsets)
