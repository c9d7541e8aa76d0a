"""Sharded and partitioned optimizer state, expressed with JAX's own SPMD shardings.

gradtx transforms are pure tree maps, so they run unchanged on sharded arrays: under ``jit`` XLA
partitions the arithmetic, and reductions (the per-leaf norms of LAMB/LARS, the global norm of
:class:`gradtx.clip_by_global_norm`, Adafactor's row/column means) become partial sums followed by
an all-reduce of a scalar or a vector, never an all-gather of a parameter. What the library adds
here is the *layout of the state*:

* :func:`state_partition_specs` / :func:`state_shardings` derive, for any transform, the
  ``PartitionSpec`` / ``NamedSharding`` tree of its state from the parameters' shardings (state
  leaves that mirror a parameter get its sharding, scalars are replicated, factored statistics get
  the parameter's spec without the reduced axis). Use it for ``jit(out_shardings=...)`` and for
  restoring a checkpoint straight into a sharded layout.
* :func:`init` runs ``tx.init`` under ``jit`` with those output shardings, so no device ever holds
  an unsharded copy of the state.
* :func:`zero_shardings` / :func:`partitioned_shardings` give ZeRO-style layouts: the optimizer state
  (and, for stage 2, the gradients) partitioned over the data-parallel axis while the parameters
  stay replicated; XLA then emits the reduce-scatter / all-gather collectives.
* :func:`zero_update` is the ZeRO optimizer step (partition the gradients, update each slice,
  re-assemble the updates), and :func:`constrain` applies a sharding tree inside ``jit`` on both kinds of mesh axes (``Explicit``:
  ``jax.sharding.reshard``; ``Auto``: ``jax.lax.with_sharding_constraint``), and
  :func:`per_device_bytes` measures the memory a layout costs each device.

No home-made communication layer: every collective is chosen by XLA from the shardings.
See ``docs/sharding.md`` for the train-step patterns (data parallel, FSDP, 2-D, ZeRO-1/2).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

__all__ = [
    "state_partition_specs", "state_shardings", "init", "zero_shardings", "partitioned_shardings",
    "constrain", "zero_update", "per_device_bytes",
]


# --------------------------------------------------------------------------------------------
# Reading the parameters

def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, (Sharding, PartitionSpec))


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(x)), jax.numpy.result_type(x))


def _param_leaves(params, shardings, what: str):
    """``(paths, treedef, abstract leaves, shardings-or-specs)`` of the parameter tree."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves_with_path:
        return [], treedef, [], []
    paths = [tuple(p) for p, _ in leaves_with_path]
    leaves = [x for _, x in leaves_with_path]
    if shardings is None:
        given = [getattr(x, "sharding", None) for x in leaves]
    elif _is_spec_leaf(shardings):
        given = [shardings] * len(leaves)
    else:
        try:
            given = treedef.flatten_up_to(shardings)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"gradtx.sharding.{what}: `shardings` does not have the structure of `params` "
                f"({e}). Pass one Sharding/PartitionSpec per parameter leaf (e.g. "
                f"jax.tree.map(lambda x: x.sharding, params)), or a single one for all.") from None
    return paths, treedef, [_abstract(x) for x in leaves], given


def _padded(spec: PartitionSpec, ndim: int, where: str) -> tuple:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"gradtx.sharding: the PartitionSpec {spec} of {where} has "
                         f"{len(entries)} entries but the array has rank {ndim}.")
    return entries + (None,) * (ndim - len(entries))


def _spec_of(sharding, ndim: int, where: str) -> tuple:
    """The padded spec of one parameter's sharding (None / fully replicated -> all None)."""
    if sharding is None:
        return (None,) * ndim
    if isinstance(sharding, PartitionSpec):
        return _padded(sharding, ndim, where)
    if isinstance(sharding, NamedSharding):
        return _padded(sharding.spec, ndim, where)
    if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
        return (None,) * ndim
    raise TypeError(
        f"gradtx.sharding: {where} has sharding {sharding!r}; expected a NamedSharding, a "
        f"PartitionSpec or a fully replicated sharding. Place the parameters with "
        f"jax.device_put(x, NamedSharding(mesh, spec)) or pass `shardings`.")


# --------------------------------------------------------------------------------------------
# Matching state leaves to the parameters they mirror

_SCALAR, _MIRROR, _DERIVED, _OTHER = "scalar", "mirror", "derived", "other"


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _suffix_len(state_path: tuple, param_path: tuple) -> int:
    n = len(param_path)
    if n > len(state_path):
        return -1
    return n if state_path[len(state_path) - n:] == param_path else -1


def _match(state_path: tuple, shape: tuple, params: list) -> tuple:
    """``(kind, param index, dropped axis or None)`` for one state leaf.

    The parameter is the one whose path is the longest suffix of the state leaf's path (``mu['w']``
    mirrors ``['w']``). ``mirror``: same shape. ``derived``: the parameter's shape with one axis
    removed (a factored statistic). Anything else is ``other`` (left replicated).
    """
    if len(shape) == 0:
        return _SCALAR, None, None
    best, best_len = [], -1
    for i, (path, _) in enumerate(params):
        n = _suffix_len(state_path, path)
        if n > best_len:
            best, best_len = [i], n
        elif n == best_len and n >= 0:
            best.append(i)
    for i in best:
        pshape = params[i][1]
        if tuple(shape) == tuple(pshape):
            return _MIRROR, i, None
    for i in best:
        pshape = tuple(params[i][1])
        if len(shape) + 1 != len(pshape):
            continue
        axes = [k for k in range(len(pshape)) if pshape[:k] + pshape[k + 1:] == tuple(shape)]
        if len(axes) == 1:
            return _DERIVED, i, axes[0]
        if len(axes) > 1:
            # A square-ish leaf: the shape cannot tell which axis was reduced. Row statistics
            # (the mean over the later axis, Adafactor's v_row) keep the earlier axis; column
            # statistics keep the later one. Without a hint, leave it replicated (always valid).
            names = " ".join(_key_name(k).lower() for k in state_path)
            if "col" in names:
                return _DERIVED, i, axes[0]
            if "row" in names:
                return _DERIVED, i, axes[-1]
            return _OTHER, i, None
    return _OTHER, None, None


def _plan(tx, params, shardings, what: str):
    """Abstract state leaves with, for each, its matched kind, parameter and derived spec."""
    paths, _, abstract, given = _param_leaves(params, shardings, what)
    abstract_params = jax.tree.unflatten(jax.tree.structure(params), abstract) if paths else params
    state = jax.eval_shape(tx.init, abstract_params)
    state_leaves, state_def = jax.tree_util.tree_flatten_with_path(state)
    param_info = [(p, a.shape) for p, a in zip(paths, abstract)]
    param_specs = [_spec_of(g, len(a.shape), f"the parameter at {jax.tree_util.keystr(p)}")
                   for p, a, g in zip(paths, abstract, given)]
    rows = []
    for path, leaf in state_leaves:
        shape = tuple(leaf.shape)
        kind, i, dropped = _match(tuple(path), shape, param_info)
        if kind == _MIRROR:
            spec = param_specs[i]
        elif kind == _DERIVED:
            spec = param_specs[i][:dropped] + param_specs[i][dropped + 1:]
        else:
            spec = (None,) * len(shape)
        rows.append(dict(leaf=leaf, kind=kind, param=i, spec=spec, dropped=dropped,
                         param_spec=param_specs[i] if i is not None else None,
                         param_shape=tuple(abstract[i].shape) if i is not None else None))
    return state_def, rows, given


def _to_spec(entries: tuple) -> PartitionSpec:
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _mesh_of(given: list, mesh, what: str):
    if mesh is not None:
        return mesh
    for g in given:
        if isinstance(g, NamedSharding):
            return g.mesh
    return None


def _sharding_for(row, given, mesh, spec: tuple):
    """A NamedSharding for a state leaf, on the mesh (and memory kind) of its parameter."""
    src = given[row["param"]] if row["param"] is not None else None
    memory_kind = src.memory_kind if isinstance(src, NamedSharding) else None
    leaf_mesh = src.mesh if isinstance(src, NamedSharding) else mesh
    return NamedSharding(leaf_mesh, _to_spec(spec), memory_kind=memory_kind)


# --------------------------------------------------------------------------------------------
# Public API

def state_partition_specs(tx, params, shardings=None):
    """The ``PartitionSpec`` tree of ``tx``'s state for parameters laid out by ``shardings``.

    ``params`` is the parameter tree (arrays, ``jax.ShapeDtypeStruct`` or Flax ``nnx.State`` /
    ``Variable`` trees); only shapes and dtypes are read. ``shardings`` gives each parameter's
    layout: a tree of ``NamedSharding`` or ``PartitionSpec`` with the structure of ``params``, one
    of them for all leaves, or None to read ``leaf.sharding`` (unsharded arrays count as
    replicated). The state is built abstractly (``jax.eval_shape(tx.init, ...)``: no memory, no
    computation) and each state leaf is mapped to the parameter it mirrors:

    * a state leaf whose path ends with a parameter's path (``[0].mu['w']`` mirrors ``['w']``) and
      has its shape gets the parameter's spec (Adam's moments, momentum traces, EMAs, ...);
    * one with the parameter's shape minus one axis (Adafactor's factored ``v_row``/``v_col``)
      gets the parameter's spec without that axis;
    * scalars (step counters, injected hyperparameters) and anything else are replicated (``P()``).

    Works for any transform (chains, ``masked``, ``partition``, wrappers), because it only looks at
    the state's paths and shapes. Optax has no equivalent (its users map specs over the state by
    hand, e.g. with ``optax.tree_utils.tree_map_params``).

    Example (a 1-device mesh; the same call plans a 1,000-device layout):
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"w": jax.ShapeDtypeStruct((4, 256), jnp.float32)}
        >>> specs = gradtx.sharding.state_partition_specs(gradtx.adamw(1e-3), params,
        ...                                                {"w": P(None, "model")})
        >>> specs[0].mu["w"], specs[0].count
        (P(None, 'model'), P())
        >>> specs = gradtx.sharding.state_partition_specs(
        ...     gradtx.adafactor(min_dim_size_to_factor=2), params, {"w": P("data", "model")})
        >>> specs[0].v_row["w"], specs[0].v_col["w"]
        (P('data',), P('model',))
    """
    state_def, rows, _ = _plan(tx, params, shardings, "state_partition_specs")
    return state_def.unflatten([_to_spec(r["spec"]) for r in rows])


def state_shardings(tx, params, shardings=None, *, mesh=None):
    """The ``NamedSharding`` tree of ``tx``'s state (see :func:`state_partition_specs`).

    ``shardings`` as in :func:`state_partition_specs`; when it holds ``PartitionSpec`` leaves (or
    the parameters are unsharded) pass the ``mesh``. Each state leaf is placed on its parameter's
    mesh and memory kind; scalars are replicated. Use the result as ``out_shardings`` of a jitted
    ``init``/train step, as the target of a checkpoint restore, or with :func:`constrain`.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = {"w": jax.device_put(jnp.zeros((2, 4)), NamedSharding(mesh, P(None, "model")))}
        >>> sh = gradtx.sharding.state_shardings(gradtx.lion(1e-3), params)
        >>> sh[0].mu["w"].spec, sh[1].count.spec
        (P(None, 'model'), P())
    """
    state_def, rows, given = _plan(tx, params, shardings, "state_shardings")
    mesh = _mesh_of(given, mesh, "state_shardings")
    out = []
    for r in rows:
        src = given[r["param"]] if r["param"] is not None else None
        if mesh is None and not isinstance(src, NamedSharding):
            single = [g for g in given if isinstance(g, Sharding)]
            if single and all(g == single[0] for g in single) and single[0].is_fully_replicated:
                out.append(single[0])       # every parameter on one device / fully replicated
                continue
            raise ValueError(
                "gradtx.sharding.state_shardings: the parameters carry no NamedSharding; pass "
                "`mesh=` (and PartitionSpecs in `shardings`), or place the parameters with "
                "jax.device_put(x, NamedSharding(mesh, spec)) first.")
        out.append(_sharding_for(r, given, mesh, r["spec"]))
    return state_def.unflatten(out)


def init(tx, params, out_shardings=None):
    """``tx.init(params)`` run under ``jit`` so each state leaf is born in its sharded layout.

    ``out_shardings`` (the state's shardings) defaults to :func:`state_shardings` of the parameters' own shardings (pass
    :func:`zero_shardings` for a ZeRO layout). No device ever materialises an unsharded copy.
    A plain ``jax.jit(tx.init)(params)`` does not do this on its own: state leaves are created from
    shapes (``zeros``), so sharding propagation has nothing to follow and XLA replicates them.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jax.device_put(jnp.ones((2, 4)), NamedSharding(mesh, P("data")))}
        >>> state = gradtx.sharding.init(gradtx.adamw(1e-3), params)
        >>> state[0].nu["w"].sharding.spec, state[0].nu["w"].tolist()[0]
        (P('data',), [0.0, 0.0, 0.0, 0.0])
    """
    if out_shardings is None:
        out_shardings = state_shardings(tx, params)
    return jax.jit(tx.init, out_shardings=out_shardings)(params)


def _axis_tuple(axis) -> tuple:
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"gradtx.sharding: axis={axis!r} must be a mesh axis name or a tuple of "
                        f"names, e.g. 'data'.")
    return axes


def _entry_axes(entry) -> tuple:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _partition(spec: tuple, shape: tuple, mesh, axes: tuple, min_size: int) -> tuple:
    """Add ``axes`` to the dimension of ``shape`` with the largest per-device extent divisible by
    their size (the ZeRO partition); unchanged if ``axes`` are already used or nothing divides."""
    used = {a for e in spec for a in _entry_axes(e)}
    if used & set(axes) or math.prod(shape) < max(min_size, 1):
        return spec
    n = math.prod(mesh.shape[a] for a in axes)
    best, best_extent = None, 0
    for d, size in enumerate(shape):
        shards = math.prod(mesh.shape[a] for a in _entry_axes(spec[d]))
        if size % shards:
            continue
        extent = size // shards
        if extent % n == 0 and extent > best_extent:
            best, best_extent = d, extent
    if best is None:
        return spec
    new = _entry_axes(spec[best]) + axes
    entry = new[0] if len(new) == 1 else new
    return spec[:best] + (entry,) + spec[best + 1:]


def _check_mesh(mesh, axes, what):
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"gradtx.sharding.{what}: the mesh has axes {tuple(mesh.shape)} but "
                         f"axis={missing[0]!r} was asked for.")


def zero_shardings(tx, params, mesh, axis: str | Sequence[str] = "data", shardings=None, *,
                   min_size: int = 0):
    """State shardings for ZeRO: each parameter-shaped state leaf partitioned over ``axis``.

    Starts from :func:`state_shardings` (so parameters that are already sharded, FSDP or tensor
    parallel, keep their layout) and, for every state leaf that mirrors a parameter (moments,
    traces), adds the data-parallel ``axis`` (a mesh axis name or a tuple of them) to the dimension
    with the largest per-device extent divisible by the axis size (the same choice as
    :func:`partitioned_shardings` makes for the parameter, so moments and gradients line up).
    Factored statistics (Adafactor's ``v_row``/``v_col``) take that partitioned spec without their
    reduced axis, so the row statistics of a row-partitioned matrix are partitioned too and the
    column statistics stay whole. Leaves of parameters already using ``axis``, with no divisible
    dimension or with fewer than ``min_size`` elements, scalars and unmatched leaves keep the
    layout of :func:`state_shardings`. With
    replicated parameters each device then holds ``1/N`` of the moments (ZeRO stage 1); constrain
    the gradients to :func:`partitioned_shardings` for stage 2. ``params`` and ``shardings`` are
    as in :func:`state_partition_specs`; unsharded parameters count as replicated on ``mesh``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jnp.zeros((3, 8)), "b": jnp.zeros(3)}
        >>> sh = gradtx.sharding.zero_shardings(gradtx.adamw(1e-3), params, mesh)
        >>> sh[0].mu["w"].spec, sh[0].mu["b"].spec, sh[0].count.spec
        (P(None, 'data'), P('data',), P())
    """
    axes = _axis_tuple(axis)
    _check_mesh(mesh, axes, "zero_shardings")
    state_def, rows, given = _plan(tx, params, shardings, "zero_shardings")
    out = []
    for r in rows:
        spec = r["spec"]
        if r["kind"] in (_MIRROR, _DERIVED):
            # The parameter's ZeRO partition (what partitioned_shardings gives its gradient);
            # a factored statistic takes it without its reduced axis, so that the gradient's
            # row/column means land in the statistic's layout with no resharding.
            spec = _partition(r["param_spec"], r["param_shape"], mesh, axes, min_size)
            if r["kind"] == _DERIVED:
                spec = spec[:r["dropped"]] + spec[r["dropped"] + 1:]
        elif r["param"] is None and len(r["leaf"].shape) >= 1:
            # per-parameter state stored in another shape (e.g. the 8-bit codes and per-block
            # scales of quantized_state): partitioned on its own largest divisible dimension
            spec = _partition(spec, tuple(r["leaf"].shape), mesh, axes, min_size)
        src = given[r["param"]] if r["param"] is not None else None
        memory_kind = src.memory_kind if isinstance(src, NamedSharding) else None
        out.append(NamedSharding(mesh, _to_spec(spec), memory_kind=memory_kind))
    return state_def.unflatten(out)


def partitioned_shardings(params, mesh, axis: str | Sequence[str] = "data", shardings=None, *,
                          min_size: int = 0):
    """The ZeRO partition of a parameter-shaped tree (gradients, updates) over ``axis``.

    The same rule as :func:`zero_shardings` applied to the parameters themselves, so a gradient
    constrained to it (``constrain(grads, partitioned_shardings(params, mesh))``) is laid out
    exactly like the optimizer's moments: XLA turns the gradient all-reduce into a reduce-scatter
    (ZeRO stage 2) and the update needs no further communication until the parameters are
    re-assembled by an all-gather. It is also a fully-sharded (FSDP-like) layout for the
    parameters themselves.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> sh = gradtx.sharding.partitioned_shardings({"w": jnp.zeros((3, 8))}, mesh)
        >>> sh["w"].spec
        P(None, 'data')
    """
    axes = _axis_tuple(axis)
    _check_mesh(mesh, axes, "partitioned_shardings")
    paths, treedef, abstract, given = _param_leaves(params, shardings, "partitioned_shardings")
    out = []
    for p, a, g in zip(paths, abstract, given):
        spec = _spec_of(g, len(a.shape), f"the parameter at {jax.tree_util.keystr(p)}")
        spec = _partition(spec, tuple(a.shape), mesh, axes, min_size)
        memory_kind = g.memory_kind if isinstance(g, NamedSharding) else None
        out.append(NamedSharding(mesh, _to_spec(spec), memory_kind=memory_kind))
    return treedef.unflatten(out)


def _explicit(sharding) -> bool:
    if not isinstance(sharding, NamedSharding):
        return False
    types = getattr(sharding.mesh, "axis_types", ())
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def constrain(tree, shardings):
    """Lay ``tree`` out as ``shardings`` inside ``jit``, on ``Explicit`` and ``Auto`` mesh axes.

    ``Explicit`` axes (``jax.make_mesh``'s default) need ``jax.sharding.reshard``; ``Auto`` axes use
    ``jax.lax.with_sharding_constraint``, which on an explicit mesh is only an assertion. This picks
    per leaf. ``shardings`` is one sharding for every leaf or a tree matching ``tree``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> f = jax.jit(lambda g: gradtx.sharding.constrain(g, NamedSharding(mesh, P("data"))))
        >>> f(jnp.ones(4)).sharding.spec
        P('data',)
    """
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(shardings, Sharding):
        targets = [shardings] * len(leaves)
    else:
        targets = treedef.flatten_up_to(shardings)
    out = []
    for x, s in zip(leaves, targets):
        if s is None:
            out.append(x)
        elif _explicit(s):
            out.append(jax.sharding.reshard(x, s))
        else:
            out.append(jax.lax.with_sharding_constraint(x, s))
    return treedef.unflatten(out)


def zero_update(tx, grads, state, params=None, *, partitioned, param_shardings=None, **extra):
    """One ZeRO optimizer step inside ``jit``: partition, update locally, re-assemble.

    ``grads`` (and ``params``, for transforms that read them) are laid out as ``partitioned``
    (usually :func:`partitioned_shardings`, the layout of the moments from :func:`zero_shardings`):
    for a gradient XLA turns the data-parallel all-reduce into a reduce-scatter (ZeRO stage 2), for
    the replicated params it is a local slice. ``tx.update`` then runs on each device's slice with
    no communication for elementwise optimizers (norms, as in LAMB/LARS/global clipping, become
    all-reduces of scalars). The updates are returned in ``param_shardings`` (an all-gather; None
    leaves them partitioned), ready for :func:`gradtx.apply_updates`. Returns ``(updates, state)``.

    Needed as written on ``Explicit`` mesh axes, where JAX refuses to combine differently sharded
    operands implicitly; on ``Auto`` axes it pins the layout XLA would otherwise have to guess.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jnp.ones((2, 4))}
        >>> tx = gradtx.adamw(0.5, weight_decay=0.0)
        >>> part = gradtx.sharding.partitioned_shardings(params, mesh)
        >>> rep = jax.tree.map(lambda _: jax.NamedSharding(mesh, jax.P()), params)
        >>> state = gradtx.sharding.init(tx, params, gradtx.sharding.zero_shardings(tx, params, mesh))
        >>> step = jax.jit(lambda g, s, p: gradtx.sharding.zero_update(
        ...     tx, g, s, p, partitioned=part, param_shardings=rep))
        >>> updates, state = step(params, state, params)
        >>> updates["w"].sharding.is_fully_replicated, updates["w"].tolist()[0]
        (True, [-0.5, -0.5, -0.5, -0.5])
    """
    grads = constrain(grads, partitioned)
    local_params = None if params is None else constrain(params, partitioned)
    updates, state = tx.update(grads, state, local_params, **extra)
    if param_shardings is not None:
        updates = constrain(updates, param_shardings)
    return updates, state


def per_device_bytes(tree, shardings=None) -> int:
    """The largest number of bytes any one device holds for ``tree`` in its layout.

    Leaves are arrays or ``jax.ShapeDtypeStruct`` (their ``.sharding`` is used, or the matching
    leaf of ``shardings``); a leaf without a sharding counts in full on one device. Replicated
    leaves count on every device.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx.sharding
        >>> gradtx.sharding.per_device_bytes({"w": jnp.zeros((4, 8)), "n": jnp.zeros((), jnp.int32)})
        132
    """
    leaves, treedef = jax.tree.flatten(tree)
    targets = ([getattr(x, "sharding", None) for x in leaves] if shardings is None
               else treedef.flatten_up_to(shardings))
    totals: dict[Any, int] = {}
    unsharded = 0
    for x, s in zip(leaves, targets):
        shape = tuple(np.shape(x))
        itemsize = np.dtype(jax.numpy.result_type(x)).itemsize
        if s is None:
            unsharded += math.prod(shape) * itemsize
            continue
        for device, index in s.devices_indices_map(shape).items():
            extent = 1
            for size, sl in zip(shape, index):
                start, stop, step = sl.indices(size)
                extent *= len(range(start, stop, step))
            totals[device] = totals.get(device, 0) + extent * itemsize
    return (max(totals.values()) if totals else 0) + unsharded
