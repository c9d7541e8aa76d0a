"""The transform protocol and the pieces every transform is built from.

A gradient transformation is a *value* with two pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params=None, **extra)
    params = gradtx.apply_updates(params, updates)

Every gradtx transform is a frozen dataclass deriving from :class:`Transform`: immutable, hashable,
equal by value, holding no arrays, with a ``repr`` that reads like the call that built it. Its
hyperparameters are declared with :func:`hyperparameter` and :func:`option`, which validate them when
the transform is built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _validate

__all__ = [
    "Transform", "EmptyState", "hyperparameter", "option", "apply_updates", "identity",
    "set_to_zero", "stateless", "transform",
]

_HYPER = "gradtx.hyperparameter"
_OPTION = "gradtx.option"


def hyperparameter(default: Any = dataclasses.MISSING, *, low=None, high=None, low_open=False,
                   high_open=False, integer=False, schedule=False, allow_none=False,
                   allow_inf=False, doc: str = ""):
    """Declare a numeric hyperparameter field of a :class:`Transform`.

    The value is checked when the transform is built: a bool, a non-number, NaN, an infinity (unless
    ``allow_inf``) or a value outside ``[low, high]`` (open ends with ``low_open``/``high_open``)
    raises ``TypeError``/``ValueError`` naming the transform, the argument and the valid range.
    ``schedule=True`` also accepts a schedule (any callable ``step -> value``), evaluated at the
    transform's step count. Concrete 0-d arrays are converted to Python scalars (transforms hold no
    arrays). Fields declared this way are the ones :func:`gradtx.inject_hyperparams` can move into
    the optimizer state.

    Example:
        >>> import dataclasses, gradtx
        >>> @gradtx.transform
        ... class scale_by_two_thirds(gradtx.Transform):
        ...     factor: float = gradtx.hyperparameter(2 / 3, low=0.0)
        >>> scale_by_two_thirds(factor=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: scale_by_two_thirds: factor=-1.0 is out of range; expected 0.0 <= factor.
    """
    spec = dict(low=low, high=high, low_open=low_open, high_open=high_open, integer=integer,
                allow_schedule=schedule, allow_none=allow_none, allow_inf=allow_inf, doc=doc)
    return dataclasses.field(default=default, metadata={_HYPER: spec})


def option(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, kind: str = "any",
           doc: str = ""):
    """Declare a non-numeric field of a :class:`Transform` (a flag, a mode, a dtype, a mask).

    ``kind`` is ``"bool"`` (must be True/False), ``"dtype"`` (a floating dtype or None, stored as its
    name so the transform stays hashable and readable), ``"choice"`` (one of ``choices``) or ``"any"``
    (checked by the transform itself in ``_check``). Options fix the program (a bool branches in
    Python, a dtype sizes the state), so :func:`gradtx.inject_hyperparams` never traces them.

    Example:
        >>> import gradtx
        >>> @gradtx.transform
        ... class scale_by_mode(gradtx.Transform):
        ...     mode: str = gradtx.option("mean", choices=("mean", "sum"))
        ...     accumulator_dtype: object = gradtx.option(None, kind="dtype")
        >>> scale_by_mode(accumulator_dtype="bfloat16")
        scale_by_mode(accumulator_dtype='bfloat16')
        >>> scale_by_mode(mode="max")
        Traceback (most recent call last):
        ...
        ValueError: scale_by_mode: mode='max' is not one of ['mean', 'sum'].
    """
    if choices is not None:
        kind = "choice"
    spec = dict(kind=kind, choices=choices, doc=doc)
    return dataclasses.field(default=default, metadata={_OPTION: spec})


def transform(cls):
    """Class decorator that makes a :class:`Transform` subclass a frozen, value-equal dataclass.

    Frozen (a transform cannot change after it is built, so it is safe as a static ``jit``
    argument), equal and hashed by value (two equal transforms share compiled code), and with the
    base class's call-like ``repr`` instead of the dataclass one. Optax transforms are
    ``NamedTuple``s of functions, equal only by identity.

    Example:
        >>> import gradtx
        >>> @gradtx.transform
        ... class scale_by_half(gradtx.Transform):
        ...     def init(self, params):
        ...         return gradtx.EmptyState()
        ...     def update(self, updates, state, params=None, **extra):
        ...         return gradtx.tree.map_leaves(self.name, lambda g: g / 2, updates), state
        >>> scale_by_half() == scale_by_half(), hash(scale_by_half()) == hash(scale_by_half())
        (True, True)
    """
    return dataclasses.dataclass(frozen=True, repr=False, eq=True)(cls)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "float('inf')" if value > 0 else "-float('inf')"
        return repr(value)
    if isinstance(value, jax.core.Tracer):
        return "<traced>"
    if callable(value) and getattr(value, "__name__", None) and not isinstance(value, Transform) \
            and not dataclasses.is_dataclass(value):
        return value.__name__
    return repr(value)


def validate_fields(obj) -> None:
    """Check and normalise every field declared with :func:`hyperparameter`/:func:`option`.

    Called from ``__post_init__`` of transforms and schedules (frozen dataclasses); then runs the
    object's ``_check`` hook for cross-field rules.
    """
    owner = type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _HYPER in f.metadata:
            spec = {k: v for k, v in f.metadata[_HYPER].items() if k != "doc"}
            value = _validate.check_number(owner, f.name, value, **spec)
        elif _OPTION in f.metadata:
            spec = f.metadata[_OPTION]
            if spec["kind"] == "bool":
                value = _validate.check_bool(owner, f.name, value)
            elif spec["kind"] == "dtype":
                value = _validate.check_dtype(owner, f.name, value)
            elif spec["kind"] == "choice":
                value = _validate.check_choice(owner, f.name, value, spec["choices"])
        object.__setattr__(obj, f.name, value)
    obj._check()


class Declared:
    """What transforms and schedules share: declared, validated fields and a call-like ``repr``.

    Subclasses are frozen dataclasses whose fields are declared with :func:`hyperparameter` and
    :func:`option`; ``__post_init__`` validates them (:func:`validate_fields`) and runs the
    ``_check`` hook for cross-field rules; the ``repr`` shows the arguments that differ from their
    defaults, so it reads like the call that built the object.
    """

    def __post_init__(self):
        validate_fields(self)

    def _check(self) -> None:
        """Cross-field validation hook; raise ValueError naming the arguments."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def _repr_args(self) -> list[str]:
        args = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            default = f.default
            if default is not dataclasses.MISSING:
                try:
                    same = value == default and type(value) is type(default)
                except Exception:  # noqa: BLE001 - arrays or tracers never equal a default
                    same = False
                if same is True:
                    continue
            args.append(f"{f.name}={_format_value(value)}")
        return args

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(self._repr_args())})"


class Transform(Declared):
    """Base class of every gradtx gradient transformation.

    Subclasses are decorated with :func:`transform` (a frozen dataclass), declare their
    hyperparameters with :func:`hyperparameter`/:func:`option`, and implement::

        init(params) -> state
        update(updates, state, params=None, **extra) -> (updates, state)

    ``update`` must accept and ignore unknown keyword arguments (the one protocol: combinators pass
    everything through). ``state`` is a NamedTuple with named fields whose structure never changes.

    The base provides validation at construction (from the field declarations, then the optional
    ``_check`` hook for cross-field rules), a ``repr`` that reads like the call that built the
    transform (only arguments that differ from their defaults are shown), value equality and hashing.
    It is interoperable with Optax: ``optax.chain`` and ``flax.nnx.Optimizer`` accept gradtx
    transforms as they are.

    Example (a complete primitive: a hyperparameter, a named state, a per-leaf map)::

        >>> from typing import Any, NamedTuple
        >>> import jax.numpy as jnp, gradtx
        >>> class ScaleByRunningMaxState(NamedTuple):
        ...     peak: Any
        >>> @gradtx.transform
        ... class scale_by_running_max(gradtx.Transform):
        ...     floor: float = gradtx.hyperparameter(1e-8, low=0.0, low_open=True)
        ...     def init(self, params):
        ...         return ScaleByRunningMaxState(gradtx.tree.zeros_like(params))
        ...     def update(self, updates, state, params=None, **extra):
        ...         def one(g, peak):
        ...             peak = jnp.maximum(peak, jnp.abs(g))
        ...             return g / jnp.maximum(peak, self.floor), peak
        ...         u, peak = gradtx.tree.map_leaves(self.name, one, updates, state.peak,
        ...                                          names=("peak",), outputs=2)
        ...         return u, ScaleByRunningMaxState(peak)
        >>> tx = gradtx.chain(scale_by_running_max(floor=1e-6), gradtx.scale_by_learning_rate(0.5))
        >>> tx
        chain(scale_by_running_max(floor=1e-06), scale_by_learning_rate(learning_rate=0.5))
        >>> u, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
        >>> u.tolist(), state[0].peak.tolist()
        ([-0.5, 0.5], [2.0, 0.5])
    """

    def init(self, params):  # pragma: no cover - the abstract protocol
        raise NotImplementedError(f"{self.name} does not implement init")

    def update(self, updates, state, params=None, **extra):  # pragma: no cover
        raise NotImplementedError(f"{self.name} does not implement update")

    def require_params(self, params) -> None:
        """Raise a clear error when a transform that reads params is called without them."""
        if params is None:
            raise ValueError(
                f"{self!r} needs the current parameters: call "
                f"tx.update(grads, state, params) (params=None was given).")


class EmptyState(NamedTuple):
    """The state of a stateless transform: a pytree with no leaves.

    It costs no memory and nothing to checkpoint; Optax's equivalent is ``optax.EmptyState``.

    Example:
        >>> import jax, gradtx
        >>> jax.tree.leaves(gradtx.scale(0.5).init({"w": 1.0})), gradtx.EmptyState()
        ([], EmptyState())
    """


@transform
class identity(Transform):
    """The transform that returns its updates unchanged; the unit of :func:`gradtx.chain`.

    Optax: ``optax.identity()``. State: :class:`EmptyState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.identity()
        >>> tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))[0]["w"].tolist()
        [1.0, 1.0]
    """

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        return updates, state


@transform
class set_to_zero(Transform):
    """Replace every update by zeros of the same shape and dtype (freezes what it is applied to).

    Optax: ``optax.set_to_zero()``. State: :class:`EmptyState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.set_to_zero()
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0].tolist()
        [0.0, 0.0]
    """

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del params, extra
        return jax.tree.map(jnp.zeros_like, updates), state


@transform
class stateless(Transform):
    """A transform from a pure function ``fn(updates, params) -> updates`` with no state.

    Write a one-off primitive in one line. ``fn`` must be hashable (a named function is; a lambda is
    too, but two equal lambdas are not equal, so prefer named functions to keep jit caches warm).
    Optax: ``optax.stateless``. State: :class:`EmptyState`.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> def centralise(updates, params):
        ...     return jax.tree.map(lambda u: u - u.mean(), updates)
        >>> tx = gradtx.stateless(centralise)
        >>> tx
        stateless(fn=centralise)
        >>> tx.update(jnp.array([1.0, 3.0]), tx.init(None))[0].tolist()
        [-1.0, 1.0]
    """

    fn: Callable = option()

    def _check(self):
        if not callable(self.fn):
            raise TypeError(f"stateless: fn={self.fn!r} is not callable; expected a function "
                            f"fn(updates, params) -> updates.")

    def init(self, params):
        del params
        return EmptyState()

    def update(self, updates, state, params=None, **extra):
        del extra
        return self.fn(updates, params), state


def apply_updates(params, updates):
    """Return ``params + updates``, each leaf cast back to its parameter's dtype.

    The sum is computed in the wider of the two dtypes and rounded once, so float32 updates applied
    to bfloat16 parameters lose no more precision than the final rounding. ``None`` leaves are
    skipped. Equivalent to ``optax.apply_updates``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> gradtx.apply_updates({"w": jnp.ones(2)}, {"w": jnp.full(2, -0.5)})["w"].tolist()
        [0.5, 0.5]
    """

    return jax.tree.map(lambda p, u: None if p is None else add_update(p, u), params, updates,
                        is_leaf=lambda x: x is None)


def add_update(p, u) -> jax.Array:
    """One leaf of :func:`apply_updates`: ``p + u`` in the wider dtype, rounded to ``p``'s dtype."""
    p = jnp.asarray(p)
    u = jnp.asarray(u)
    if p.dtype == u.dtype:
        return p + u
    with jax.numpy_dtype_promotion("standard"):
        wide = jnp.promote_types(p.dtype, u.dtype)
    return (p.astype(wide) + u.astype(wide)).astype(p.dtype)
