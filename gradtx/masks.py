"""Parameter groups: select parameters by path pattern, by rank or by a predicate.

A *selector* is an immutable, hashable value that is called on a parameter tree and returns a tree
of bools with exactly that tree's structure (one bool per parameter)::

    mask = gradtx.masks.paths("*/bias")(params)      # {'dense': {'bias': True, 'kernel': False}}

so it plugs into every ``mask=`` argument (:func:`gradtx.masked`, ``add_decoupled_weight_decay``,
every optimizer alias, :func:`gradtx.freeze`). A *labeller* (:class:`labels`) returns a tree of group
labels for :func:`gradtx.partition` (per-group hyperparameters, torch's parameter groups).

Selectors are resolved against the tree they are given, each time they are given one (at trace time,
so it costs nothing at run time), and work identically on

- plain nested dicts / lists / tuples,
- Linen params dicts (``{'params': {'Dense_0': {'kernel': ...}}}``),
- a Flax NNX ``State``, whose leaves are ``nnx.Variable`` wrappers when ``init`` is called and raw
  arrays when ``update`` is: a Variable counts as one parameter (its bool sits at the Variable's
  position, a valid prefix of both forms) and its internal ``value`` key is not part of the path.

**Paths.** A parameter's path is its keys joined with ``/``: ``"dense/kernel"``,
``"params/Dense_0/bias"``, ``"layers/0/kernel"`` (sequence indices are numbers).

**Patterns** are ``fnmatch`` globs (``*`` matches any characters *including* ``/``, ``?`` one
character, ``[abc]`` a set). A pattern matches a path if it matches the whole path **or any tail of
it that starts at a segment boundary**, so patterns are position-independent: ``"bias"`` matches
``"dense/bias"`` and ``"params/Dense_0/bias"``; ``"embed*"`` matches ``"embed/embedding"`` and
``"params/embed/embedding"`` (and any path with a segment starting with ``embed``). A pattern that
starts with ``/`` is anchored at the root: ``"/embed*"`` matches ``"embed/embedding"`` only.
Matching is case-sensitive unless ``case_sensitive=False``.

**Typos raise.** By default (``strict=True``) every pattern of :class:`paths` must match at least one
parameter, else ``ValueError`` names the pattern and lists available paths — a misspelt pattern
must not silently disable weight decay. Use ``strict=False`` for patterns that may legitimately
match nothing (e.g. a selector applied inside :func:`gradtx.partition`, which only shows it that
group's parameters). A tree with no parameters at all is not checked.

Selectors compose with ``&``, ``|`` and ``~`` (or :class:`all_of`, :class:`any_of`, :class:`not_`).

Optax: ``optax.masked`` / ``optax.partition`` take a callable ``params -> mask`` that the user writes
(typically with ``jax.tree_util.tree_map_with_path``); torch builds parameter groups by hand from
``named_parameters()``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from typing import Any, Callable, Hashable, Mapping

import jax
import numpy as np

__all__ = ["Selector", "paths", "rank", "where", "all_of", "any_of", "not_", "decay_default",
           "labels", "leaf_paths"]


# --------------------------------------------------------------------------------------------
# Paths of a tree


def _is_variable(x) -> bool:
    """True for a Flax NNX Variable (checked without importing flax)."""
    for name in ("flax.nnx.variablelib", "flax.nnx"):
        mod = sys.modules.get(name)
        var = getattr(mod, "Variable", None) if mod is not None else None
        if var is not None and isinstance(x, var):
            return True
    return False


def _key_str(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path) -> str:
    keys = list(path)
    # A Variable's array sits under GetAttrKey('value'): that key is not part of the name.
    while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    return "/".join(_key_str(k) for k in keys)


def _unwrap(leaf):
    if _is_variable(leaf):
        inner = jax.tree.leaves(leaf)
        return inner[0] if len(inner) == 1 else leaf
    return leaf


def _flatten(tree):
    """``([(path_str, leaf), ...], treedef)`` with each NNX Variable counted as one leaf."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return [(_path_str(p), _unwrap(x)) for p, x in with_path], treedef


def leaf_paths(tree) -> list[str]:
    """The ``/``-joined path of every parameter of ``tree``, in flattening order.

    Use it to see what patterns are matched against.

    Example:
        >>> import gradtx
        >>> gradtx.masks.leaf_paths({"params": {"Dense_0": {"bias": 0.0, "kernel": 1.0}}})
        ['params/Dense_0/bias', 'params/Dense_0/kernel']
    """
    return [p for p, _ in _flatten(tree)[0]]


def _ndim(leaf) -> int:
    shape = getattr(leaf, "shape", None)
    return len(shape) if shape is not None else int(np.ndim(leaf))


# --------------------------------------------------------------------------------------------
# Selectors


class Selector:
    """Base class of the selectors: ``selector(params) -> tree of bools`` with params' structure.

    Subclasses are frozen dataclasses (hashable, equal by value) implementing ``_evaluate(entries)``
    on the list of ``(path, leaf)`` pairs. Combine selectors with ``&``, ``|`` and ``~``.
    Optax has no selector objects (its masks are trees or plain functions).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> sel = gradtx.masks.rank(at_least=2) & ~gradtx.masks.paths("embed")
        >>> isinstance(sel, gradtx.masks.Selector)
        True
        >>> sel({"embed": jnp.zeros((4, 2)), "w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
        {'b': False, 'embed': False, 'w': True}
    """

    def _evaluate(self, entries) -> list[bool]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, tree):
        entries, treedef = _flatten(tree)
        return treedef.unflatten([bool(b) for b in self._evaluate(entries)])

    def __and__(self, other):
        return all_of(self, _as_selector("&", other))

    def __or__(self, other):
        return any_of(self, _as_selector("|", other))

    def __invert__(self):
        return not_(self)


def _as_selector(where_: str, spec) -> Selector:
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        return paths(spec)
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(s, str) for s in spec):
        return paths(*spec)
    raise TypeError(f"gradtx.masks: {where_} got {spec!r}; expected a selector (gradtx.masks.paths, "
                    f"rank, where, ...), a pattern string or a tuple of pattern strings.")


def _match(pattern: str, path: str, case_sensitive: bool) -> bool:
    if not case_sensitive:
        pattern, path = pattern.lower(), path.lower()
    if pattern.startswith("/"):
        return fnmatch.fnmatchcase(path, pattern[1:])
    if fnmatch.fnmatchcase(path, pattern):
        return True
    start = path.find("/")
    while start >= 0:
        if fnmatch.fnmatchcase(path[start + 1:], pattern):
            return True
        start = path.find("/", start + 1)
    return False


@dataclasses.dataclass(frozen=True, repr=False)
class paths(Selector):
    """Select the parameters whose path matches any of ``patterns`` (see the module docstring).

    ``strict=True`` (default): each pattern must match at least one parameter of the tree the
    selector is called on, else ``ValueError`` (naming the pattern and listing available paths).
    ``case_sensitive=True`` (default): ``"*norm*"`` does not match ``"LayerNorm"`` unless
    ``case_sensitive=False``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        ...           "embed": {"embedding": jnp.ones((3, 2))}}
        >>> gradtx.masks.paths("*/bias", "embed*")(params)
        {'dense': {'bias': True, 'kernel': False}, 'embed': {'embedding': True}}
        >>> gradtx.masks.paths("*/baias")(params)
        Traceback (most recent call last):
        ...
        ValueError: gradtx.masks.paths('*/baias'): the pattern '*/baias' matches no parameter ...
    """

    patterns: tuple = ()
    strict: bool = True
    case_sensitive: bool = True

    def __init__(self, *patterns: str, strict: bool = True, case_sensitive: bool = True):
        if not patterns:
            raise ValueError("gradtx.masks.paths: give at least one pattern, e.g. paths('*/bias').")
        for p in patterns:
            if not isinstance(p, str) or not p or p == "/":
                raise TypeError(f"gradtx.masks.paths: pattern {p!r} is not a non-empty string; "
                                f"expected globs such as '*/bias' or 'embed*'.")
        for name, value in (("strict", strict), ("case_sensitive", case_sensitive)):
            if not isinstance(value, bool):
                raise TypeError(f"gradtx.masks.paths: {name}={value!r} must be True or False.")
        object.__setattr__(self, "patterns", tuple(patterns))
        object.__setattr__(self, "strict", strict)
        object.__setattr__(self, "case_sensitive", case_sensitive)

    def __repr__(self):
        args = [repr(p) for p in self.patterns]
        if not self.strict:
            args.append("strict=False")
        if not self.case_sensitive:
            args.append("case_sensitive=False")
        return f"paths({', '.join(args)})"

    def _evaluate(self, entries):
        hits = [[_match(pat, path, self.case_sensitive) for path, _ in entries]
                for pat in self.patterns]
        if self.strict and entries:
            for pat, row in zip(self.patterns, hits):
                if not any(row):
                    available = [path for path, _ in entries]
                    shown = ", ".join(repr(p) for p in available[:8])
                    more = f", ... ({len(available)} in total)" if len(available) > 8 else ""
                    raise ValueError(
                        f"gradtx.masks.{self!r}: the pattern {pat!r} matches no parameter "
                        f"(a typo would silently change which parameters are selected). "
                        f"Available paths: {shown}{more}. Fix the pattern, or pass strict=False if "
                        f"it may legitimately match nothing (e.g. inside gradtx.partition, which "
                        f"shows each group only its own parameters).")
        return [any(col) for col in zip(*hits)] if entries else []


@dataclasses.dataclass(frozen=True, repr=False)
class rank(Selector):
    """Select parameters by number of dimensions: ``ndim == equal`` and/or ``at_least <= ndim <= at_most``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "s": jnp.ones(())}
        >>> gradtx.masks.rank(at_least=2)(params)
        {'b': False, 's': False, 'w': True}
        >>> gradtx.masks.rank(1)(params)
        {'b': True, 's': False, 'w': False}
    """

    equal: int | None = None
    at_least: int | None = None
    at_most: int | None = None

    def __post_init__(self):
        given = {k: getattr(self, k) for k in ("equal", "at_least", "at_most")
                 if getattr(self, k) is not None}
        if not given:
            raise ValueError("gradtx.masks.rank: give equal=, at_least= or at_most=, e.g. "
                             "rank(at_least=2) for matrices and larger.")
        for k, v in given.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"gradtx.masks.rank: {k}={v!r}; expected a non-negative int.")

    def __repr__(self):
        if self.equal is not None and self.at_least is None and self.at_most is None:
            return f"rank({self.equal})"
        args = [f"{k}={getattr(self, k)}" for k in ("equal", "at_least", "at_most")
                if getattr(self, k) is not None]
        return f"rank({', '.join(args)})"

    def _evaluate(self, entries):
        out = []
        for _, leaf in entries:
            n = _ndim(leaf)
            ok = ((self.equal is None or n == self.equal)
                  and (self.at_least is None or n >= self.at_least)
                  and (self.at_most is None or n <= self.at_most))
            out.append(ok)
        return out


@dataclasses.dataclass(frozen=True, repr=False)
class where(Selector):
    """Select parameters for which ``predicate(path, leaf)`` is true.

    ``path`` is the ``/``-joined path string; ``leaf`` is the array (or ``jax.ShapeDtypeStruct``;
    an NNX Variable is unwrapped to its array). The predicate runs at trace time: decide from the
    path, shape and dtype, not from values. It must be hashable (a named function is).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> def big(path, leaf):
        ...     return leaf.size > 4
        >>> gradtx.masks.where(big)({"w": jnp.ones((3, 3)), "b": jnp.ones(3)})
        {'b': False, 'w': True}
    """

    predicate: Callable = None

    def __post_init__(self):
        if not callable(self.predicate):
            raise TypeError(f"gradtx.masks.where: predicate={self.predicate!r} is not callable; "
                            f"expected a function (path: str, leaf) -> bool.")
        try:
            hash(self.predicate)
        except TypeError:
            raise TypeError("gradtx.masks.where: the predicate is not hashable; use a named "
                            "function.") from None

    def __repr__(self):
        return f"where({getattr(self.predicate, '__name__', repr(self.predicate))})"

    def _evaluate(self, entries):
        return [bool(self.predicate(path, leaf)) for path, leaf in entries]


def _flatten_members(cls, members):
    out = []
    for m in members:
        if isinstance(m, cls):
            out.extend(m.selectors)
        else:
            out.append(m)
    return tuple(out)


@dataclasses.dataclass(frozen=True, repr=False)
class all_of(Selector):
    """Select parameters selected by every one of ``selectors`` (``a & b``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> sel = gradtx.masks.rank(2) & gradtx.masks.paths("dec*")
        >>> sel
        (rank(2) & paths('dec*'))
        >>> sel({"dec": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "enc": {"w": jnp.ones((2, 2))}})
        {'dec': {'b': False, 'w': True}, 'enc': {'w': False}}
    """

    selectors: tuple = ()

    def __init__(self, *selectors):
        if not selectors:
            raise ValueError("gradtx.masks.all_of: give at least one selector.")
        members = tuple(_as_selector("all_of", s) for s in selectors)
        object.__setattr__(self, "selectors", _flatten_members(all_of, members))

    def __repr__(self):
        return "(" + " & ".join(repr(s) for s in self.selectors) + ")"

    def _evaluate(self, entries):
        cols = [s._evaluate(entries) for s in self.selectors]
        return [all(c) for c in zip(*cols)] if entries else []


@dataclasses.dataclass(frozen=True, repr=False)
class any_of(Selector):
    """Select parameters selected by at least one of ``selectors`` (``a | b``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> sel = gradtx.masks.paths("b") | gradtx.masks.rank(0)
        >>> sel({"w": jnp.ones((2, 2)), "b": jnp.ones(2), "s": jnp.ones(())})
        {'b': True, 's': True, 'w': False}
    """

    selectors: tuple = ()

    def __init__(self, *selectors):
        if not selectors:
            raise ValueError("gradtx.masks.any_of: give at least one selector.")
        members = tuple(_as_selector("any_of", s) for s in selectors)
        object.__setattr__(self, "selectors", _flatten_members(any_of, members))

    def __repr__(self):
        return "(" + " | ".join(repr(s) for s in self.selectors) + ")"

    def _evaluate(self, entries):
        cols = [s._evaluate(entries) for s in self.selectors]
        return [any(c) for c in zip(*cols)] if entries else []


@dataclasses.dataclass(frozen=True, repr=False)
class not_(Selector):
    """Select the parameters that ``selector`` does not select (``~selector``).

    A strict :class:`paths` inside still raises when one of its patterns matches nothing.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> (~gradtx.masks.paths("b"))({"w": jnp.ones(2), "b": jnp.ones(2)})
        {'b': False, 'w': True}
    """

    selector: Selector = None

    def __init__(self, selector):
        object.__setattr__(self, "selector", _as_selector("not_", selector))

    def __repr__(self):
        return f"~{self.selector!r}"

    def __invert__(self):
        return self.selector

    def _evaluate(self, entries):
        return [not b for b in self.selector._evaluate(entries)]


_NO_DECAY_PATTERNS = ("bias", "*norm*/scale", "*norm*/weight", "*norm*/bias")


@dataclasses.dataclass(frozen=True, repr=False)
class decay_default(Selector):
    """The usual weight-decay mask: True for the leaves that should be decayed.

    Selects every parameter with ``ndim >= 2`` (kernels, embeddings, convolution filters) except
    those whose last path segment is ``bias`` or that sit in a normalisation layer (a path segment
    containing ``norm``, any case, followed by ``scale``/``weight``/``bias``: ``LayerNorm_0/scale``,
    ``RMSNorm/weight``). So biases, norm scales/offsets and every 0-D/1-D leaf get no decay — the
    convention of BERT, GPT-2 and most torch recipes (minGPT also spares embeddings: add
    ``& ~paths("embed*")``). It never raises for an absent pattern (a model without norms is fine).

    Equivalent to ``rank(at_least=2) & ~paths("bias", "*norm*/scale", "*norm*/weight",
    "*norm*/bias", strict=False, case_sensitive=False)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        ...           "LayerNorm_0": {"scale": jnp.ones(2)}}
        >>> gradtx.masks.decay_default()(params)
        {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'scale': False}}
    """

    def __repr__(self):
        return "decay_default()"

    @property
    def selector(self) -> Selector:
        return rank(at_least=2) & ~paths(*_NO_DECAY_PATTERNS, strict=False, case_sensitive=False)

    def _evaluate(self, entries):
        return self.selector._evaluate(entries)


# --------------------------------------------------------------------------------------------
# Labels for partition


@dataclasses.dataclass(frozen=True, repr=False)
class labels:
    """A labeller for :func:`gradtx.partition`: ``labels(params) -> tree of group labels``.

    ``groups`` maps each label to a selector, a pattern string or a tuple of patterns (strings
    become strict :class:`paths`). A parameter selected by no group gets ``default``; with
    ``default=None`` every parameter must be selected by a group (else ``ValueError`` listing the
    unassigned paths). A parameter selected by two groups raises ``ValueError`` naming it and both
    groups (``overlap="error"``, the default: groups form a partition, and torch too rejects a
    parameter in two groups); ``overlap="first"`` gives it the first matching group in the order
    of ``groups``.

    Per-group hyperparameters (torch's parameter groups): give each label its own transform in
    :func:`gradtx.partition`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> params = {"embed": {"embedding": jnp.ones((4, 2))},
        ...           "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
        >>> lab = gradtx.masks.labels({"embed": "embed*", "no_decay": "bias"}, default="rest")
        >>> lab(params)
        {'dense': {'bias': 'no_decay', 'kernel': 'rest'}, 'embed': {'embedding': 'embed'}}
        >>> tx = gradtx.partition({"embed": gradtx.scale_by_learning_rate(0.25),
        ...                        "no_decay": gradtx.scale_by_learning_rate(1.0),
        ...                        "rest": gradtx.scale_by_learning_rate(0.5)}, labels=lab)
        >>> u, _ = tx.update(params, tx.init(params))
        >>> u["embed"]["embedding"][0].tolist(), u["dense"]["kernel"][0].tolist()
        ([-0.25, -0.25], [-0.5, -0.5])
    """

    groups: tuple = ()
    default: Hashable = None
    overlap: str = "error"

    def __init__(self, groups: Mapping[Hashable, Any], default: Hashable = None,
                 overlap: str = "error"):
        if not isinstance(groups, Mapping) or not groups:
            raise TypeError(f"gradtx.masks.labels: groups={groups!r}; expected a non-empty dict "
                            f"mapping each label to a selector or pattern(s).")
        items = []
        for label, spec in groups.items():
            try:
                hash(label)
            except TypeError:
                raise TypeError(f"gradtx.masks.labels: label {label!r} is not hashable.") from None
            items.append((label, _as_selector(f"the group {label!r}", spec)))
        if overlap not in ("error", "first"):
            raise ValueError(f"gradtx.masks.labels: overlap={overlap!r} is not one of "
                             f"['error', 'first'].")
        try:
            hash(default)
        except TypeError:
            raise TypeError(f"gradtx.masks.labels: default={default!r} is not hashable.") from None
        object.__setattr__(self, "groups", tuple(items))
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "overlap", overlap)

    def __repr__(self):
        body = ", ".join(f"{k!r}: {s!r}" for k, s in self.groups)
        args = ["{" + body + "}"]
        if self.default is not None:
            args.append(f"default={self.default!r}")
        if self.overlap != "error":
            args.append(f"overlap={self.overlap!r}")
        return f"labels({', '.join(args)})"

    def __call__(self, tree):
        entries, treedef = _flatten(tree)
        cols = [(label, sel._evaluate(entries)) for label, sel in self.groups]
        out, unassigned = [], []
        for i, (path, _) in enumerate(entries):
            hits = [label for label, col in cols if col[i]]
            if len(hits) > 1 and self.overlap == "error":
                raise ValueError(
                    f"gradtx.masks.labels: the parameter {path!r} is selected by the groups "
                    f"{hits[0]!r} and {hits[1]!r}; a parameter must belong to one group. Narrow "
                    f"one of them (e.g. with & ~other), or pass overlap='first' to give it the "
                    f"first matching group.")
            if hits:
                out.append(hits[0])
            elif self.default is not None:
                out.append(self.default)
            else:
                unassigned.append(path)
                out.append(None)
        if unassigned:
            shown = ", ".join(repr(p) for p in unassigned[:8])
            raise ValueError(f"gradtx.masks.labels: {len(unassigned)} parameter(s) belong to no "
                             f"group ({shown}); add a group for them or pass default=<label>.")
        return treedef.unflatten(out)
