"""Combinators: build optimizers out of transforms.

``chain`` runs transforms in sequence, ``named_chain`` does the same with named state, ``masked``
applies a transform to a subset of the parameters, and ``partition`` applies a different transform to
each labelled group. Each accepts any object with ``init``/``update`` (an Optax transform too).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax

from gradtx import numerics
from gradtx.base import Transform, _format_value, transform
from gradtx.tree import TreeMismatchError, first_difference, zeros_like

__all__ = ["chain", "named_chain", "masked", "partition", "MaskedNode", "MaskedState",
           "PartitionState", "FrozenTree"]


# --------------------------------------------------------------------------------------------
# Foreign transforms (Optax's and anything else with init/update)

def _is_transform_like(obj) -> bool:
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


@functools.lru_cache(maxsize=None)
def _accepts_extra(update_fn) -> bool:
    if isinstance(getattr(update_fn, "__self__", None), Transform):
        return True
    try:
        params = inspect.signature(update_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_update(tx, updates, state, params, extra):
    """Call ``tx.update``, forwarding ``extra`` keyword arguments only if ``tx`` accepts them."""
    if extra and _accepts_extra(tx.update):
        return tx.update(updates, state, params, **extra)
    return tx.update(updates, state, params)


def update_if(run, tx, updates, state, params, extra):
    """``call_update`` when the traced bool ``run`` holds, else zero updates and ``state``
    unchanged, under ``lax.cond``: the inner update is not executed on held steps."""
    def inner(s):
        return call_update(tx, updates, s, params, extra)

    shapes = jax.eval_shape(inner, state)[0]

    def hold(s):
        return zeros_like(shapes), s

    return jax.lax.cond(run, inner, hold, state)


def _check_member(owner: str, tx, where: str):
    if not _is_transform_like(tx):
        raise TypeError(f"{owner}: {where} is {tx!r}, which has no init/update; expected a "
                        f"gradient transformation (a gradtx transform or an Optax one).")
    try:
        hash(tx)
    except TypeError:
        raise TypeError(f"{owner}: {where} ({type(tx).__name__}) is not hashable; transforms must be "
                        f"immutable values.") from None


# --------------------------------------------------------------------------------------------
# chain / named_chain

# An extra keyword argument (forwarded like any other, so it reaches nested chains) with which a
# wrapper that does not store its inner optimizer's state as returned (gradtx.quantized_state
# re-encodes it) turns the replay off: kept in their buffers, the new moments would only become
# float32 temporaries there.
NO_REPLAY = "_gradtx_no_replay"


def _replay_stop(transforms) -> int | None:
    """Index of the first member that takes norms of the updates it receives
    (``_update_from``) and whose predecessors can all replay theirs (``_replayable_update``)."""
    for i, tx in enumerate(transforms):
        if i and callable(getattr(tx, "_update_from", None)):
            if all(callable(getattr(t, "_replayable_update", None)) for t in transforms[:i]):
                return i
            return None
    return None


def _run_in_order(transforms, updates, states, params, extra):
    """Run ``transforms`` one after another; returns the final updates and the list of states.

    A member that takes norms of the updates it receives (:class:`gradtx.scale_by_trust_ratio`)
    would read them twice, in the norm and in the parameter update, and XLA would write them to a
    parameter-sized temporary. When every member before it can recompute its updates from the new
    state it returned (Adam's direction from ``m'``, ``v'`` and the count; weight decay's from
    its input and ``p``), the norm is taken from that recomputation instead: it reads the new
    state (through a barrier, so that XLA fuses it into the norm's own loop) and the updates feed
    only the parameter update. Same values, no temporary. The protocol is private: a member may
    define ``_replayable_update(updates, state, params)``, returning its updates, its new state
    and a function ``(updates, new_state, params) -> updates`` (or ``None``), and a norm-taking
    member ``_update_from(updates, recomputed, state, params)``.
    """
    may_replay = params is not None and not extra.get(NO_REPLAY, False)
    stop = _replay_stop(transforms) if may_replay else None
    grads, new_states, replays = updates, [], []
    for i, (tx, state) in enumerate(zip(transforms, states)):
        if stop is not None and i < stop:
            updates, state, replay = tx._replayable_update(updates, state, params, **extra)
            replays.append(replay)
        elif i == stop and all(r is not None for r in replays):
            recomputed, prior, p = numerics.unshared((grads, tuple(new_states), params))
            for replay, prior_state in zip(replays, prior):
                recomputed = replay(recomputed, prior_state, p)
            updates, state = tx._update_from(updates, recomputed, state, params, **extra)
        else:
            updates, state = call_update(tx, updates, state, params, extra)
        new_states.append(state)
    return updates, new_states


@transform
class chain(Transform):
    """Apply transforms one after another: ``chain(a, b)(g) = b(a(g))``.

    The state is the tuple of the members' states, in order. Extra keyword arguments given to
    ``update`` reach every member. ``chain()`` with no member is the identity. Members may be
    gradtx transforms or any object with ``init``/``update`` (Optax transforms included). When a
    member takes norms of the updates it receives (:class:`gradtx.scale_by_trust_ratio`) and every
    member before it can recompute its updates from its new state, the chain gives it that
    recomputation for the norms, so the updates are never materialised (see
    :class:`gradtx.scale_by_trust_ratio`); the result is the same.
    Optax: ``optax.chain``. torch has no equivalent: its optimizers are monolithic.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.chain(gradtx.scale(2.0), gradtx.scale_by_learning_rate(0.25))
        >>> tx
        chain(scale(factor=2.0), scale_by_learning_rate(learning_rate=0.25))
        >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        >>> updates.tolist()
        [-0.5, -0.5]
    """

    transforms: tuple = dataclasses.field(default=())

    def __init__(self, *transforms):
        for i, tx in enumerate(transforms):
            _check_member("chain", tx, f"argument {i}")
        object.__setattr__(self, "transforms", tuple(transforms))

    def __repr__(self):
        return f"chain({', '.join(repr(t) for t in self.transforms)})"

    def init(self, params):
        return tuple(tx.init(params) for tx in self.transforms)

    def update(self, updates, state, params=None, **extra):
        if not isinstance(state, tuple) or len(state) != len(self.transforms):
            raise TreeMismatchError(
                f"chain of {len(self.transforms)} transforms got a state of type "
                f"{type(state).__name__}{' of length ' + str(len(state)) if isinstance(state, tuple) else ''}; "
                f"pass the state returned by this chain's init/update.")
        updates, new_states = _run_in_order(self.transforms, updates, state, params, extra)
        return updates, tuple(new_states)


@transform
class named_chain(Transform):
    """A :class:`chain` whose state is a dict keyed by member name (readable, path-stable).

    ``named_chain(("adam", scale_by_adam()), ("lr", scale_by_learning_rate(1e-3)))``. Names must be
    unique strings. Optax: ``optax.named_chain``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.named_chain(("sign", gradtx.scale_by_sign()),
        ...                         ("lr", gradtx.scale_by_learning_rate(0.5)))
        >>> sorted(tx.init(jnp.zeros(2)))
        ['lr', 'sign']
        >>> tx.update(jnp.array([3.0, -2.0]), tx.init(jnp.zeros(2)))[0].tolist()
        [-0.5, 0.5]
    """

    transforms: tuple = dataclasses.field(default=())

    def __init__(self, *named_transforms):
        seen = set()
        items = []
        for i, item in enumerate(named_transforms):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"named_chain: argument {i} is {item!r}; expected a (name, "
                                f"transform) pair with a string name.")
            name, tx = item
            if name in seen:
                raise ValueError(f"named_chain: the name {name!r} is used twice; names must be "
                                 f"unique.")
            seen.add(name)
            _check_member("named_chain", tx, f"member {name!r}")
            items.append((name, tx))
        object.__setattr__(self, "transforms", tuple(items))

    def __repr__(self):
        return f"named_chain({', '.join(f'({n!r}, {t!r})' for n, t in self.transforms)})"

    def init(self, params):
        return {name: tx.init(params) for name, tx in self.transforms}

    def update(self, updates, state, params=None, **extra):
        names = [name for name, _ in self.transforms]
        for name in names:
            if name not in state:
                raise TreeMismatchError(f"named_chain: the state has no entry {name!r}; it has "
                                        f"{sorted(state)}.")
        updates, new_states = _run_in_order([tx for _, tx in self.transforms], updates,
                                            [state[name] for name in names], params, extra)
        return updates, dict(zip(names, new_states))


# --------------------------------------------------------------------------------------------
# Masks and labels held as hashable values

class MaskedNode(NamedTuple):
    """Stands for a parameter (or subtree) that a masked inner transform does not see.

    A pytree with no leaves: the inner transform keeps no state for it. Optax's
    ``optax.MaskedNode`` plays the same role.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> tx = gradtx.masked(gradtx.trace(0.9), {"w": True, "b": False})
        >>> state = tx.init({"w": jnp.zeros(2), "b": jnp.zeros(3)})
        >>> state.inner_state.trace["b"], jax.tree.leaves(gradtx.MaskedNode())
        (MaskedNode(), [])
    """


@dataclasses.dataclass(frozen=True, eq=True)
class FrozenTree:
    """A tree of hashable leaves (a mask or a label tree) held as an immutable, hashable value.

    ``masked``/``partition`` convert the trees users pass into this form so that the transform
    stays hashable and holds no arrays. ``FrozenTree(tree).tree`` gives the tree back.
    """

    treedef: Any
    leaves: tuple

    @classmethod
    def of(cls, owner: str, arg: str, tree, leaf_check: Callable[[Any], bool], expected: str):
        leaves, treedef = jax.tree.flatten(tree)
        normalised = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not leaf_check(leaf):
                raise TypeError(f"{owner}: {arg} has {leaf!r} at {jax.tree_util.keystr(path)}; "
                                f"expected {expected} at every leaf.")
            normalised.append(leaf.item() if hasattr(leaf, "item") else leaf)
        del leaves
        return cls(treedef, tuple(normalised))

    @property
    def tree(self):
        return self.treedef.unflatten(self.leaves)

    def __repr__(self):
        return repr(self.tree)


def _is_bool(x) -> bool:
    return isinstance(x, bool) or (hasattr(x, "dtype") and getattr(x, "shape", None) == ()
                                   and str(x.dtype) == "bool" and not isinstance(x, jax.core.Tracer))


def _resolve(owner: str, spec, tree):
    """A mask/label spec resolved against a tree: FrozenTree -> tree, callable -> called on it."""
    if isinstance(spec, FrozenTree):
        return spec.tree
    resolved = spec(tree)
    if isinstance(resolved, FrozenTree):
        return resolved.tree
    return resolved


def _map_prefix(owner: str, fn, prefix, tree, what: str):
    """``fn(prefix_leaf, subtree)`` over a prefix tree, with a clear error on mismatch."""
    try:
        return jax.tree.map(fn, prefix, tree, is_leaf=lambda x: x is None)
    except ValueError as e:
        raise TreeMismatchError(
            f"{owner}: the {what} is not a prefix of the parameter/update tree "
            f"({first_difference(prefix, tree)}). Build the {what} from the same parameters "
            f"(or pass a callable / a gradtx.masks selector that builds it).") from e


def _select(owner, mask, tree, what="mask"):
    return _map_prefix(owner, lambda m, sub: sub if m else MaskedNode(), mask, tree, what)


def _merge(owner, mask, chosen, fallback, what="mask"):
    def pick(m, new, old):
        return new if m else old
    try:
        return jax.tree.map(pick, mask, chosen, fallback,
                            is_leaf=lambda x: x is None or isinstance(x, MaskedNode))
    except ValueError as e:
        raise TreeMismatchError(f"{owner}: the {what} does not match the updates "
                                f"({first_difference(mask, fallback)}).") from e


def _freeze_spec(owner: str, arg: str, spec, leaf_check, expected):
    if callable(spec) and not isinstance(spec, (dict, list, tuple)):
        try:
            hash(spec)
        except TypeError:
            raise TypeError(f"{owner}: {arg} is an unhashable callable; use a named function or "
                            f"a gradtx.masks selector.") from None
        return spec
    return FrozenTree.of(owner, arg, spec, leaf_check, expected)


# --------------------------------------------------------------------------------------------
# masked

class MaskedState(NamedTuple):
    """State of :class:`masked`: the inner transform's state over the selected leaves."""

    inner_state: Any


@transform
class masked(Transform):
    """Apply ``inner`` to the selected parameters only; the others' updates pass through unchanged.

    ``mask`` is a tree of bools with the parameters' structure (or a prefix of it: a bool at a
    subtree selects the whole subtree), a callable ``params -> such a tree``, or a
    :mod:`gradtx.masks` selector. The inner transform keeps no state for unselected leaves.
    Optax: ``optax.masked`` (same semantics: unselected updates are passed through, not zeroed; use
    :func:`gradtx.partition` with :class:`gradtx.set_to_zero` to freeze).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.masked(gradtx.scale(0.0), {"w": True, "b": False})
        >>> u, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(2)},
        ...                  tx.init({"w": jnp.ones(2), "b": jnp.ones(2)}))
        >>> u["w"].tolist(), u["b"].tolist()
        ([0.0, 0.0], [1.0, 1.0])
    """

    inner: Any = None
    mask: Any = None

    def __init__(self, inner, mask):
        _check_member("masked", inner, "inner")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "mask", _freeze_spec("masked", "mask", mask, _is_bool,
                                                      "True or False"))

    def __repr__(self):
        return f"masked({self.inner!r}, mask={_format_value(self.mask)})"

    def init(self, params):
        mask = _resolve("masked", self.mask, params)
        return MaskedState(self.inner.init(_select("masked", mask, params)))

    def update(self, updates, state, params=None, **extra):
        mask = _resolve("masked", self.mask, updates if params is None else params)
        sub_updates = _select("masked", mask, updates)
        sub_params = None if params is None else _select("masked", mask, params)
        new_sub, inner_state = call_update(self.inner, sub_updates, state.inner_state, sub_params,
                                           extra)
        return _merge("masked", mask, new_sub, updates), MaskedState(inner_state)


# --------------------------------------------------------------------------------------------
# partition

class PartitionState(NamedTuple):
    """State of :class:`partition`: each group's inner state, keyed by label."""

    inner_states: dict


def _is_label(x) -> bool:
    if isinstance(x, (list, dict, tuple)) or x is None:
        return False
    try:
        hash(x)
    except TypeError:
        return False
    return not hasattr(x, "shape") or getattr(x, "shape", None) == ()


@transform
class partition(Transform):
    """Apply a different transform to each labelled group of parameters.

    ``transforms`` maps each label to a transform; ``labels`` is a tree (or prefix tree) of labels
    with the parameters' structure, a callable ``params -> such a tree``, or a :mod:`gradtx.masks`
    labeller. Every parameter gets exactly one label; a label with no transform raises an error
    naming it. Each group's state holds only that group's leaves. Optax: ``optax.partition``
    (formerly ``multi_transform``); torch: parameter groups.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.partition({"fast": gradtx.scale_by_learning_rate(1.0),
        ...                        "frozen": gradtx.set_to_zero()},
        ...                       labels={"w": "fast", "b": "frozen"})
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> u, _ = tx.update(params, tx.init(params))
        >>> u["w"].tolist(), u["b"].tolist()
        ([-1.0, -1.0], [0.0, 0.0])
    """

    transforms: tuple = ()
    labels: Any = None

    def __init__(self, transforms: Mapping[Hashable, Any], labels):
        if not isinstance(transforms, Mapping) or not transforms:
            raise TypeError(f"partition: transforms={transforms!r}; expected a non-empty dict "
                            f"mapping each label to a transform.")
        for label, tx in transforms.items():
            _check_member("partition", tx, f"the transform for label {label!r}")
        object.__setattr__(self, "transforms", tuple(transforms.items()))
        object.__setattr__(self, "labels", _freeze_spec("partition", "labels", labels, _is_label,
                                                        "a hashable label"))

    def __repr__(self):
        members = ", ".join(f"{k!r}: {t!r}" for k, t in self.transforms)
        return f"partition({{{members}}}, labels={_format_value(self.labels)})"

    def _labels(self, tree):
        labels = _resolve("partition", self.labels, tree)
        known = {k for k, _ in self.transforms}
        unknown = sorted({repr(x) for x in jax.tree.leaves(labels)} - {repr(k) for k in known})
        if unknown:
            raise ValueError(f"partition: the labels use {', '.join(unknown)}, which have no "
                             f"transform; transforms are given for {sorted(map(repr, known))}.")
        return labels

    def init(self, params):
        labels = self._labels(params)
        return PartitionState({
            label: tx.init(_select("partition", jax.tree.map(lambda x, k=label: x == k, labels),
                                   params, "labels"))
            for label, tx in self.transforms})

    def update(self, updates, state, params=None, **extra):
        labels = self._labels(updates if params is None else params)
        new_states = {}
        for label, tx in self.transforms:
            mask = jax.tree.map(lambda x, k=label: x == k, labels)
            sub_updates = _select("partition", mask, updates, "labels")
            sub_params = None if params is None else _select("partition", mask, params, "labels")
            new_sub, new_states[label] = call_update(tx, sub_updates, state.inner_states[label],
                                                     sub_params, extra)
            updates = _merge("partition", mask, new_sub, updates, "labels")
        return updates, PartitionState(new_states)
