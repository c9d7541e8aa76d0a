"""Tree math used by the transforms: leaf-wise maps with clear mismatch errors, norms, casts.

Everything here works on any pytree (dicts, lists, tuples, Flax NNX ``State``, Linen dicts) and is
pure and jit-friendly. The structure checks happen at trace time only and cost nothing at run time.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import compiler

__all__ = [
    "TreeMismatchError", "map_leaves", "zeros_like", "cast", "global_norm", "leaf_norm",
    "leaf_norms", "all_finite",
    "first_difference", "keystr", "full_like",
]


class TreeMismatchError(ValueError):
    """A gradient tree does not match a transform's state or the parameters.

    Raised by :func:`map_leaves` (so by every primitive) before any arithmetic, naming the
    transform, the first differing path and what differs (structure, shape or dtype). A subclass of
    ``ValueError``; Optax raises whatever ``jax.tree.map`` raises instead.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adam(1e-3)
        >>> state = tx.init({"w": jnp.zeros(3)})
        >>> try:
        ...     tx.update({"w": jnp.zeros(4)}, state)
        ... except gradtx.TreeMismatchError as e:
        ...     print(type(e).__name__, "['w']" in str(e))
        TreeMismatchError True
    """


def keystr(path) -> str:
    """A key path as the text errors show (``['layer'][1]``); ``<root>`` for the empty path.

    Example:
        >>> import jax, gradtx
        >>> path = jax.tree_util.tree_flatten_with_path({"layer": [1.0, 2.0]})[0][1][0]
        >>> gradtx.tree.keystr(path), gradtx.tree.keystr(())
        ("['layer'][1]", '<root>')
    """
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def _is_empty_node(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and not x._fields


def first_difference(a, b) -> str:
    """Describe the first path at which two pytrees differ in structure.

    Example:
        >>> import gradtx
        >>> gradtx.tree.first_difference({"a": 1, "b": 2}, {"a": 1, "c": 2})
        "at leaf 1: ['b'] vs ['c']"
    """
    # empty named tuples (EmptyState, MaskedNode) have no leaves: count them as leaves here so a
    # masked-out parameter still shows up as a path
    a_leaves = jax.tree_util.tree_flatten_with_path(a, is_leaf=_is_empty_node)[0]
    b_leaves = jax.tree_util.tree_flatten_with_path(b, is_leaf=_is_empty_node)[0]
    a_paths = [keystr(p) for p, _ in a_leaves]
    b_paths = [keystr(p) for p, _ in b_leaves]
    for i, (pa, pb) in enumerate(zip(a_paths, b_paths)):
        if pa != pb:
            return f"at leaf {i}: {pa} vs {pb}"
    if len(a_paths) != len(b_paths):
        longer, which = (a_paths, "first") if len(a_paths) > len(b_paths) else (b_paths, "second")
        return (f"{len(a_paths)} vs {len(b_paths)} leaves; the {which} tree has extra leaf "
                f"{longer[min(len(a_paths), len(b_paths))]}")
    return (f"same leaf paths but different container types: "
            f"{jax.tree.structure(a)} vs {jax.tree.structure(b)}")


def _check_leaf(owner, path, u, other, what, same_shape, inexact):
    if inexact and not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
        raise TypeError(f"{owner}: the update at {keystr(path)} has dtype {jnp.result_type(u)}; "
                        f"expected a floating-point gradient (cast integer data before "
                        f"differentiating, or freeze that leaf).")
    if same_shape and other is not None and np.shape(u) != np.shape(other):
        raise TreeMismatchError(
            f"{owner}: the update at {keystr(path)} has shape {np.shape(u)} but its {what} has "
            f"shape {np.shape(other)}; was the state initialised with different parameters?")


# The updates of the state primitives (below) traced while the structure is in use, for as long as
# their tracers live. A state primitive further down a chain that receives one keeps the plain
# structure: recomputing from it would read that expression (a division, a square root) in two
# computations, and XLA materialises such an expression rather than duplicate it (RMSprop's
# direction into its momentum: 2x slower, not faster).
_STATE_UPDATES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def map_leaves(owner: str, fn: Callable, updates, *others, names: Sequence[str] = (),
               outputs: int = 1, same_shape: bool = True, inexact: bool = True,
               update_from_old_state: bool = False):
    """Map ``fn(u, *o)`` over the leaves of ``updates`` and trees of the same structure.

    ``others`` are state trees (or the params) that must have exactly the structure of ``updates``;
    ``names`` name them in errors. A mismatch raises :class:`TreeMismatchError` naming ``owner`` (the
    transform) and the first differing path; with ``same_shape`` each pair of leaves must have the
    same shape; with ``inexact`` integer/bool updates raise ``TypeError``. With ``outputs > 1``,
    ``fn`` returns a tuple and a tuple of trees is returned.

    ``update_from_old_state`` is for a primitive whose ``fn`` returns ``(update, *new_state)``
    with the update computed from the new state (Adam's ``m'``, ``v'``), elementwise. Under
    ``jit``, on a backend whose compiler merges loops that read the same arrays but not a loop with
    the loop consuming its result (XLA's CPU backend with multi-output fusion on, see
    :func:`gradtx.xla_flags`), the update is then taken from a second call of ``fn`` on the same
    gradient and old state, each multiplied by a 1 passed through an optimization barrier
    (``compiler._opaque``): the same operations on the same values, but a computation
    of its own that reads the old state, so the state writes and the parameter update fuse into
    one pass (AdamW: 7 arrays moved instead of 10). Not for a leaf that is itself such a
    primitive's update (see ``_STATE_UPDATES``), complex leaves, or outside a trace. Elsewhere it
    changes nothing. See ``docs/performance.md``, "One loop per leaf".

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> g, m = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, 0.5])}
        >>> u, m = gradtx.tree.map_leaves("demo", lambda g, m: (g + m, 0.5 * m), g, m,
        ...                               names=("mu",), outputs=2)
        >>> u["w"].tolist(), m["w"].tolist()
        ([1.5, 2.5], [0.25, 0.25])
        >>> gradtx.tree.map_leaves("demo", lambda g, m: g, g, {"b": jnp.zeros(2)}, names=("mu",))
        Traceback (most recent call last):
        ...
        gradtx.tree.TreeMismatchError: demo: the updates do not have the structure of its mu (at leaf 0: ['w'] vs ['b']). Initialise the optimizer with the same parameter tree you pass gradients for.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [p for p, _ in leaves_with_path]
    leaves = [x for _, x in leaves_with_path]
    columns = []
    names = list(names) + [f"argument {i + 2}" for i in range(len(names), len(others))]
    for name, tree in zip(names, others):
        other_leaves, other_def = jax.tree.flatten(tree)
        if other_def != treedef:
            raise TreeMismatchError(
                f"{owner}: the updates do not have the structure of its {name} "
                f"({first_difference(updates, tree)}). Initialise the optimizer with the same "
                f"parameter tree you pass gradients for.")
        columns.append(other_leaves)
    results = []
    merging = (update_from_old_state and outputs > 1 and columns and leaves
               and all(isinstance(x, jax.core.Tracer) for x in leaves)
               and compiler._update_from_old_state())
    recompute = merging and not any(_STATE_UPDATES.get(id(x)) is x for x in leaves)
    for i, (path, u) in enumerate(zip(paths, leaves)):
        row = [col[i] for col in columns]
        _check_leaf(owner, path, u, row[0] if row else None, names[0] if names else "",
                    same_shape, inexact)
        out = fn(u, *row)
        if recompute and not jnp.iscomplexobj(u):
            out = (fn(*compiler._opaque((u, *row)))[0],) + tuple(out[1:])
        if merging:
            _STATE_UPDATES[id(out[0])] = out[0]
        results.append(out)
    if outputs == 1:
        return treedef.unflatten(results)
    return tuple(treedef.unflatten([r[k] for r in results]) for k in range(outputs))


def zeros_like(tree, dtype: Any = None):
    """Zeros shaped like each leaf; ``dtype=None`` keeps each leaf's dtype.

    Works on abstract leaves (``jax.ShapeDtypeStruct``) and on Flax ``Variable`` wrappers (the map
    reaches the arrays inside them).

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> z = gradtx.tree.zeros_like({"w": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}, "float32")
        >>> z["w"].dtype.name, z["w"].tolist()
        ('float32', [0.0, 0.0])
    """
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype or jnp.result_type(x)), tree)


def full_like(tree, value, dtype: Any = None):
    """Constant-filled arrays shaped like each leaf.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.tree.full_like({"w": jnp.zeros(2)}, 0.5)["w"].tolist()
        [0.5, 0.5]
    """
    return jax.tree.map(lambda x: jnp.full(jnp.shape(x), value, dtype or jnp.result_type(x)), tree)


def cast(tree, dtype):
    """Cast every leaf to ``dtype`` (no-op for leaves already of that dtype).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.tree.cast({"w": jnp.ones(2)}, jnp.bfloat16)["w"].dtype.name
        'bfloat16'
    """
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), tree)


def _sum_of_squares(x):
    x = jnp.asarray(x)
    wide = jnp.float64 if x.dtype in (jnp.float64, jnp.complex128) else jnp.float32
    if jnp.iscomplexobj(x):
        return jnp.sum(jnp.real(x * jnp.conj(x))).astype(wide)
    x = x.astype(wide)
    return jnp.sum(x * x)


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, accumulated in float32 (float64 under x64 leaves).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> float(gradtx.tree.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0], jnp.bfloat16)}))
        5.0
    """
    squares = [_sum_of_squares(x) for x in jax.tree.leaves(tree)]
    if not squares:
        return jnp.zeros((), jnp.float32)
    total = squares[0]
    for s in squares[1:]:
        total = total + s.astype(total.dtype)
    return jnp.sqrt(total)


def leaf_norm(x) -> jax.Array:
    """The L2 (Frobenius) norm of one leaf, accumulated in float32 (float64 for float64 leaves).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> float(gradtx.tree.leaf_norm(jnp.array([[3.0, 0.0], [0.0, 4.0]])))
        5.0
    """
    return jnp.sqrt(_sum_of_squares(x))


def leaf_norms(tree):
    """The L2 norm of each leaf (float32 scalars), as a tree of the same structure.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> n = gradtx.tree.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
        >>> float(n["a"]), float(n["b"])
        (5.0, 2.0)
    """
    return jax.tree.map(leaf_norm, tree)


def all_finite(tree) -> jax.Array:
    """A boolean scalar: True when every element of every leaf is finite (no NaN, no ±Inf).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> bool(gradtx.tree.all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}))
        False
    """
    ok = jnp.ones((), bool)
    for leaf in jax.tree.leaves(tree):
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok
