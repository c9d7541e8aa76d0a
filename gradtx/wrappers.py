"""Wrappers around an optimizer for the training loop.

- :class:`inject_hyperparams` moves numeric hyperparameters into the state (set at run time without
  recompiling, read for logging, vmap over them for sweeps); :func:`set_hyperparam` sets one.
- :func:`current_hyperparams` reads every hyperparameter's current value (learning-rate schedules
  included) from *any* state, no wrapper needed.
- :class:`accumulate_gradients` (gradient accumulation; Optax's ``MultiSteps``), :class:`skip_nonfinite`
  (drop NaN/Inf steps), :class:`lookahead`, :class:`freeze`, :class:`switch` (one optimizer, then
  another) wrap an inner transform.
- :class:`ema_params` and :class:`swa` keep an average of the parameters in the state without changing
  the updates; :func:`averaged_params` returns it.

Every wrapper is a gradtx transform (a frozen, hashable value with a call-like ``repr``) whose state is
a NamedTuple with named fields; inner transforms may be gradtx or Optax transforms, and extra keyword
arguments given to ``update`` are forwarded to them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _validate, numerics
from gradtx.base import _HYPER, Transform, add_update, hyperparameter, option, transform
from gradtx.combine import (FrozenTree, _check_member, _freeze_spec, _is_bool,
                            _is_transform_like, _merge, _resolve, _select, call_update,
                            update_if)
from gradtx.tree import TreeMismatchError, all_finite, map_leaves, zeros_like

__all__ = [
    "inject_hyperparams", "InjectHyperparamsState", "set_hyperparam", "current_hyperparams",
    "accumulate_gradients", "AccumulateGradientsState", "skip_nonfinite", "SkipNonfiniteState",
    "lookahead", "LookaheadState", "ema_params", "EmaParamsState", "swa", "SwaState",
    "averaged_params", "freeze", "FreezeState", "switch", "SwitchState",
]


# --------------------------------------------------------------------------------------------
# Walking a transform tree: members, hyperparameters, readable names


def _members(tx):
    """``[(component, field, index, key, child)]`` for the transforms ``tx`` holds.

    A field holding one transform contributes a member named after the field (``inner`` is
    transparent: it adds no name component); a tuple field contributes its transform items
    (named by position) and its ``(key, transform)`` pairs (named by key), which covers
    :func:`gradtx.chain`, :func:`gradtx.named_chain` and :func:`gradtx.partition`.
    """
    if not (isinstance(tx, Transform) and dataclasses.is_dataclass(tx)):
        return []
    out = []
    for f in dataclasses.fields(tx):
        if _HYPER in f.metadata:
            continue
        value = getattr(tx, f.name)
        if _is_transform_like(value) and not isinstance(value, type):
            out.append(("" if f.name == "inner" else f.name, f.name, None, None, value))
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if _is_transform_like(item) and not isinstance(item, type):
                    out.append((str(i), f.name, i, None, item))
                elif (isinstance(item, tuple) and len(item) == 2
                      and _is_transform_like(item[1]) and not isinstance(item[1], type)):
                    out.append((str(item[0]), f.name, i, item[0], item[1]))
    return out


def _member_state(state, field, index, key):
    """The state of one member, following the containers' state conventions."""
    if state is None:
        return None
    if index is None:
        return getattr(state, f"{field}_state", None)
    if key is None:
        if isinstance(state, tuple) and not hasattr(state, "_fields") and index < len(state):
            return state[index]
        return None
    for holder in (getattr(state, "inner_states", None), state):
        if isinstance(holder, dict) and key in holder:
            return holder[key]
    return None


def _hyper_fields(tx):
    if not (isinstance(tx, Transform) and dataclasses.is_dataclass(tx)):
        return []
    return [(f.name, getattr(tx, f.name), f.metadata[_HYPER]) for f in dataclasses.fields(tx)
            if _HYPER in f.metadata]


def _injectable(value, spec) -> bool:
    return (not spec.get("integer") and value is not None and not _validate.is_schedule(value)
            and isinstance(value, (int, float)) and not isinstance(value, bool))


def _name(prefix: tuple, tx, field: str) -> str:
    return ".".join(prefix + (type(tx).__name__, field))


def _walk(tx, state=None, prefix=()):
    """Yield ``(name, tx, field, value, spec, state_of_tx, overrides)`` for every hyperparameter."""
    for field, value, spec in _hyper_fields(tx):
        yield _name(prefix, tx, field), tx, field, value, spec, state
    for component, field, index, key, child in _members(tx):
        sub_prefix = prefix + ((component,) if component else ())
        yield from _walk(child, _member_state(state, field, index, key), sub_prefix)


def _rebuild(tx, values: dict, prefix=()):
    """A copy of ``tx`` whose hyperparameters named in ``values`` are replaced (arrays allowed).

    Copies are made with ``object.__setattr__`` on a shallow copy (no validation: the values are
    traced or already validated), so containers with custom constructors rebuild as well.
    """
    changes = {}
    for field, value, spec in _hyper_fields(tx):
        name = _name(prefix, tx, field)
        if name in values:
            changes[field] = values[name]
    for component, field, index, key, child in _members(tx):
        sub_prefix = prefix + ((component,) if component else ())
        new_child = _rebuild(child, values, sub_prefix)
        if new_child is child:
            continue
        if index is None:
            changes[field] = new_child
        else:
            items = list(changes.get(field, getattr(tx, field)))
            items[index] = new_child if key is None else (key, new_child)
            changes[field] = tuple(items)
    if not changes:
        return tx
    new = copy.copy(tx)
    for field, value in changes.items():
        object.__setattr__(new, field, value)
    return new


def _matches(name: str, query: str) -> bool:
    return name == query or name.endswith("." + query)


# --------------------------------------------------------------------------------------------
# inject_hyperparams


class InjectHyperparamsState(NamedTuple):
    """State of :class:`inject_hyperparams`.

    ``hyperparams``: dict from readable name to a float32 array (the value every following update
    uses); ``inner_state``: the wrapped transform's state.
    """

    hyperparams: dict
    inner_state: Any


@transform
class inject_hyperparams(Transform):
    """Move the numeric hyperparameters of ``inner`` (and of every transform inside it) into the state.

    Every field declared with :func:`gradtx.hyperparameter` whose value is a number (not an integer
    hyperparameter such as a period, not None, not a schedule) becomes a float32 array in
    ``state.hyperparams``, keyed by a readable name::

        <member path>.<transform name>.<argument>

    where the member path lists the position in a :func:`gradtx.chain` (``0``, ``1``, ...), the name
    in a :func:`gradtx.named_chain`, the label in a :func:`gradtx.partition`, or the field of a
    wrapper (``first``/``second`` of :class:`switch`); single-member wrappers (``masked``,
    ``accumulate_gradients``, ...) add nothing. E.g. for
    ``chain(scale_by_adam(), add_decoupled_weight_decay(1e-4), scale_by_learning_rate(1e-3))``:
    ``"0.scale_by_adam.b1"``, ``"1.add_decoupled_weight_decay.rate"``,
    ``"2.scale_by_learning_rate.learning_rate"``; for a bare transform ``"scale.factor"``.

    At each update the inner transform is rebuilt with the state's values (traced arrays under jit)
    and run, so:

    - results equal the uninjected transform's: bit for bit when run op by op, for transforms that
      evaluate hyperparameters in float32 (:func:`gradtx.numerics.value_at`). Under ``jit`` the
      uninjected program has its hyperparameters as compile-time constants, which XLA may fold
      or fuse differently (e.g. into fused multiply-adds), so the two can differ in the last bit;
      a transform that does scalar arithmetic on Python floats in float64 differs in the last bit
      from its float32-injected version;
    - changing a value (:func:`set_hyperparam` or ``state._replace``) does not recompile;
    - values are float32 whatever the parameters' dtype (never rounded to bfloat16);
    - the state can be vmapped over, e.g. a learning-rate sweep in one program.

    Schedule-valued hyperparameters stay schedules (they are not injected); read their current value
    with :func:`current_hyperparams`. ``exclude`` lists names (or name suffixes, e.g. ``"eps"``)
    to keep static. Initialisation uses the transform's own values.

    Optax: ``optax.inject_hyperparams(optimizer_factory)(**kwargs)`` injects the factory's
    arguments only (and casts them to the parameters' dtype, Optax #1414); here any nested
    hyperparameter of an already-built optimizer is injected. torch: ``optimizer.param_groups[i]["lr"]``.

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> tx = gradtx.inject_hyperparams(gradtx.chain(gradtx.scale(2.0),
        ...                                             gradtx.scale_by_learning_rate(0.5)))
        >>> state = tx.init(jnp.zeros(2))
        >>> sorted(state.hyperparams)
        ['0.scale.factor', '1.scale_by_learning_rate.learning_rate']
        >>> step = jax.jit(tx.update)
        >>> step(jnp.ones(2), state)[0].tolist()
        [-1.0, -1.0]
        >>> state = gradtx.set_hyperparam(state, "learning_rate", 0.25)
        >>> step(jnp.ones(2), state)[0].tolist(), step._cache_size()
        ([-0.5, -0.5], 1)
    """

    inner: Any = option()
    exclude: tuple = option(())

    def _check(self):
        _check_member("inject_hyperparams", self.inner, "inner")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(e, str) for e in exclude):
            raise TypeError(f"inject_hyperparams: exclude={self.exclude!r}; expected a tuple of "
                            f"hyperparameter names such as ('0.scale_by_adam.eps',) or ('eps',).")
        object.__setattr__(self, "exclude", tuple(exclude))
        known = [n for n, _ in _walk_names(self.inner)]
        for e in self.exclude:
            if not any(_matches(n, e) for n in known):
                raise ValueError(f"inject_hyperparams: exclude names {e!r}, which is no "
                                 f"hyperparameter of the inner transform; known: {known}.")
        self.names()  # raises on duplicate names

    def names(self) -> tuple:
        """The injected hyperparameters' names, in walking order."""
        return tuple(n for n, _ in self._injected())

    def _injected(self):
        seen = {}
        for name, tx, field, value, spec, _ in _walk(self.inner):
            if not _injectable(value, spec) or any(_matches(name, e) for e in self.exclude):
                continue
            if name in seen:
                raise ValueError(f"inject_hyperparams: two hyperparameters are both named {name!r}; "
                                 f"give the members distinct names (e.g. with gradtx.named_chain).")
            seen[name] = value
        return list(seen.items())

    def init(self, params):
        values = {name: jnp.asarray(value, jnp.float32) for name, value in self._injected()}
        return InjectHyperparamsState(values, self.inner.init(params))

    def update(self, updates, state, params=None, **extra):
        expected = self.names()
        given = state.hyperparams
        if not isinstance(given, dict) or set(given) != set(expected):
            have = sorted(given) if isinstance(given, dict) else type(given).__name__
            raise TreeMismatchError(
                f"inject_hyperparams: the state's hyperparams are {have} but this transform "
                f"injects {sorted(expected)}; pass the state returned by this transform's init.")
        values = {k: jnp.asarray(v, jnp.float32) for k, v in given.items()}
        inner = _rebuild(self.inner, values)
        new_updates, inner_state = call_update(inner, updates, state.inner_state, params, extra)
        return new_updates, InjectHyperparamsState(given, inner_state)


def _walk_names(tx):
    return [(name, value) for name, _, _, value, _, _ in _walk(tx)]


def set_hyperparam(state, name: str, value):
    """Return ``state`` with the injected hyperparameter ``name`` set to ``value`` (float32).

    ``name`` is a full name (``"2.scale_by_learning_rate.learning_rate"``) or a suffix that picks
    exactly one name (``"learning_rate"``, ``"scale_by_adam.b1"``). The state may be the state of
    :class:`inject_hyperparams` or contain one (e.g. inside a chain); every contained injection
    state with a matching name is updated. ``value`` may be an array (a batch of values for
    ``jax.vmap``). Works inside jit; does not recompile a jitted step when the value changes.
    Equivalent by hand: ``state._replace(hyperparams={**state.hyperparams, name: value})``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.inject_hyperparams(gradtx.scale_by_learning_rate(0.1))
        >>> state = gradtx.set_hyperparam(tx.init(jnp.zeros(1)), "learning_rate", 0.5)
        >>> state.hyperparams["scale_by_learning_rate.learning_rate"].tolist()
        0.5
    """
    found = []

    def is_inject(x):
        return isinstance(x, InjectHyperparamsState)

    def setter(node):
        if not is_inject(node):
            return node
        keys = [k for k in node.hyperparams if _matches(k, name)]
        if len(keys) > 1:
            raise ValueError(f"set_hyperparam: {name!r} matches several hyperparameters {keys}; "
                             f"give the full name.")
        if not keys:
            found.append(sorted(node.hyperparams))
            return node
        found.append(keys[0])
        hyper = dict(node.hyperparams)
        hyper[keys[0]] = jnp.asarray(value, jnp.float32)
        return node._replace(hyperparams=hyper)

    new_state = jax.tree.map(setter, state, is_leaf=is_inject)
    if not any(isinstance(f, str) for f in found):
        known = [n for f in found if isinstance(f, list) for n in f]
        raise ValueError(f"set_hyperparam: no injected hyperparameter is named {name!r} "
                         f"(known: {known}); wrap the optimizer in gradtx.inject_hyperparams "
                         f"to set hyperparameters at run time."
                         if found else
                         f"set_hyperparam: the state contains no gradtx.inject_hyperparams state; "
                         f"wrap the optimizer in gradtx.inject_hyperparams first.")
    return new_state


# --------------------------------------------------------------------------------------------
# current_hyperparams


def current_hyperparams(tx, state, which: str = "last") -> dict:
    """Every float hyperparameter's current value, read from ``tx`` and its ``state`` (any state).

    Returns a dict from the :class:`inject_hyperparams` naming (``"2.scale_by_learning_rate.learning_rate"``)
    to a float32 array, for logging (works under jit and on vmapped states). Values come from:

    - an injected value in an :class:`inject_hyperparams` state, if any;
    - a schedule evaluated at the step count in its transform's state (``state.count``), following
      the gradtx convention that an update at count ``c`` (``0`` for the first update) uses
      ``schedule(c)``. ``which="last"`` (default) gives the value used by the most recent update,
      ``schedule(count - 1)`` (before the first update: the value the first update will use,
      ``schedule(0)``); ``which="next"`` gives the value the next update will use,
      ``schedule(count)``. A schedule whose transform keeps no ``count`` is left out;
    - the number held by the transform otherwise.

    Integer hyperparameters (periods, sizes) and ``None`` values are left out. Optax transforms
    inside are opaque. Optax needs ``inject_hyperparams`` to log a learning rate (Optax #206);
    torch: ``optimizer.param_groups[0]["lr"]`` (the next value).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> def halve_each_step(count):
        ...     return jnp.exp2(-jnp.asarray(count, jnp.float32))
        >>> tx = gradtx.chain(gradtx.scale(2.0), gradtx.scale_by_learning_rate(halve_each_step))
        >>> state = tx.init(jnp.zeros(1))
        >>> for _ in range(3):
        ...     _, state = tx.update(jnp.ones(1), state)
        >>> {k: v.tolist() for k, v in gradtx.current_hyperparams(tx, state).items()}
        {'0.scale.factor': 2.0, '1.scale_by_learning_rate.learning_rate': 0.25}
        >>> gradtx.current_hyperparams(tx, state, which="next")["1.scale_by_learning_rate.learning_rate"].tolist()
        0.125
    """
    if which not in ("last", "next"):
        raise ValueError(f"current_hyperparams: which={which!r} is not one of ['last', 'next'].")
    out = {}
    _collect(tx, state, (), which, {}, out)
    return out


def _collect(tx, state, prefix, which, injected, out):
    if isinstance(tx, inject_hyperparams) and isinstance(state, InjectHyperparamsState):
        injected = dict(injected)
        for n in tx.names():
            if n in state.hyperparams:
                injected[".".join(prefix + (n,))] = state.hyperparams[n]
    for field, value, spec in _hyper_fields(tx):
        name = _name(prefix, tx, field)
        if name in injected:
            out[name] = jnp.asarray(injected[name], jnp.float32)
        elif value is None or spec.get("integer") or isinstance(value, bool):
            continue
        elif _validate.is_schedule(value):
            count = getattr(state, "count", None)
            if count is None:
                continue
            count = jnp.asarray(count, jnp.int32)
            if which == "last":
                count = jnp.maximum(count - 1, 0)
            out[name] = numerics.value_at(value, count)
        elif isinstance(value, (int, float)) or _validate.is_traced(value):
            out[name] = jnp.asarray(value, jnp.float32)
    for component, field, index, key, child in _members(tx):
        sub_prefix = prefix + ((component,) if component else ())
        _collect(child, _member_state(state, field, index, key), sub_prefix, which, injected, out)


# --------------------------------------------------------------------------------------------
# Shared helpers for the wrappers


def _average_dtype(requested, leaf):
    if requested is not None:
        return jnp.dtype(requested)
    return numerics.compute_dtype(jnp.result_type(leaf))


def _fresh_copy(params, dtype_of):
    """Each leaf as a new array of ``dtype_of(leaf)``: never the parameter's own buffer (``astype``
    to the same dtype returns its input, and a state leaf that *is* a parameter cannot be donated
    together with it)."""
    return jax.tree.map(lambda p: jnp.array(jnp.asarray(p), dtype=dtype_of(p), copy=True), params)


def _copy_params(params, requested):
    return _fresh_copy(params, lambda p: _average_dtype(requested, p))


# --------------------------------------------------------------------------------------------
# accumulate_gradients


class AccumulateGradientsState(NamedTuple):
    """State of :class:`accumulate_gradients`.

    ``micro_step``: int32 number of micro-batch gradients held in ``grad_sum`` (0 right after an
    applying step); ``grad_sum``: their sum, in the accumulator dtype; ``inner_state``: the inner
    optimizer's state (advanced only on applying steps); ``applied``: bool, whether the most recent
    update applied the inner optimizer (False after init).
    """

    micro_step: jax.Array
    grad_sum: Any
    inner_state: Any
    applied: jax.Array


@transform
class accumulate_gradients(Transform):
    """Gradient accumulation: apply ``inner`` to the mean gradient of every ``every_k`` micro-batches.

    Each update adds the gradient to a running sum. On every ``every_k``-th update the mean
    ``(g_1 + ... + g_k) / k`` (summed in order in ``accumulator_dtype``, then divided by ``k`` and
    cast to the gradient's dtype) is given to ``inner`` and its updates are returned; on the other
    updates the output is zeros and ``inner`` is **not run** (``lax.cond``: its state is untouched
    and no compute is spent). So ``k`` micro-steps equal one step of ``inner`` on the mean gradient,
    i.e. the large-batch step when micro-batches have equal size. ``state.applied`` tells whether the
    latest update applied. Extra keyword arguments reach ``inner`` on applying steps.
    Under ``vmap`` with a batched flag, ``lax.cond`` becomes a select and both branches run.

    ``accumulator_dtype``: dtype of the running sum, default ``"float32"`` (``None``: each
    parameter's dtype).

    Optax: ``optax.MultiSteps(opt, every_k_schedule=k)`` keeps a running mean and evaluates the
    inner update every micro-step, discarding it (Optax #472). torch: call ``optimizer.step()``
    every k ``backward()`` passes with the loss divided by k.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.accumulate_gradients(gradtx.scale_by_learning_rate(1.0), every_k=2)
        >>> state = tx.init(jnp.zeros(1))
        >>> u, state = tx.update(jnp.array([1.0]), state)
        >>> u.tolist(), bool(state.applied)
        ([0.0], False)
        >>> u, state = tx.update(jnp.array([3.0]), state)
        >>> u.tolist(), bool(state.applied)
        ([-2.0], True)
    """

    inner: Any = option()
    every_k: int = hyperparameter(integer=True, low=1)
    accumulator_dtype: Any = option("float32", kind="dtype")

    def _check(self):
        _check_member("accumulate_gradients", self.inner, "inner")

    def init(self, params):
        def zeros(p):
            dtype = numerics.state_dtype(self.accumulator_dtype, p)
            if jnp.iscomplexobj(p) and not jnp.issubdtype(dtype, jnp.complexfloating):
                # a real accumulator would drop the imaginary part: use the complex counterpart
                dtype = jnp.complex128 if jnp.dtype(dtype) == jnp.float64 else jnp.complex64
            return jnp.zeros(jnp.shape(p), dtype)

        sums = jax.tree.map(zeros, params)
        return AccumulateGradientsState(numerics.init_count(), sums, self.inner.init(params),
                                        jnp.zeros((), bool))

    def update(self, updates, state, params=None, **extra):
        k = self.every_k
        grad_sum = map_leaves(self.name, lambda g, a: a + g.astype(a.dtype), updates,
                              state.grad_sum, names=("grad_sum",))
        micro_step = state.micro_step + jnp.ones((), jnp.int32)
        apply = micro_step >= k

        def run_inner(grad_sum, inner_state):
            mean = jax.tree.map(lambda a, g: (a / k).astype(g.dtype), grad_sum, updates)
            new_updates, new_inner = call_update(self.inner, mean, inner_state, params, extra)
            return new_updates, new_inner, jax.tree.map(jnp.zeros_like, grad_sum)

        shapes = jax.eval_shape(run_inner, grad_sum, state.inner_state)[0]

        def hold(grad_sum, inner_state):
            return zeros_like(shapes), inner_state, grad_sum

        new_updates, inner_state, grad_sum = jax.lax.cond(apply, run_inner, hold, grad_sum,
                                                          state.inner_state)
        micro_step = jnp.where(apply, jnp.zeros((), jnp.int32), micro_step)
        return new_updates, AccumulateGradientsState(micro_step, grad_sum, inner_state, apply)


# --------------------------------------------------------------------------------------------
# skip_nonfinite


class SkipNonfiniteState(NamedTuple):
    """State of :class:`skip_nonfinite`.

    ``inner_state``: the inner optimizer's state (unchanged by skipped steps);
    ``consecutive_nonfinite``: int32 number of non-finite steps in a row up to the latest update
    (0 after a finite one); ``total_skips``: int32 number of skipped steps since init;
    ``skipped``: bool, whether the latest update was skipped.
    """

    inner_state: Any
    consecutive_nonfinite: jax.Array
    total_skips: jax.Array
    skipped: jax.Array


@transform
class skip_nonfinite(Transform):
    """Skip steps whose gradients contain NaN or Inf: zero updates and the inner state unchanged.

    A step is *bad* when any gradient element is NaN or ±Inf. A bad step is skipped — the updates
    are zeros (so ``apply_updates`` leaves the parameters unchanged) and the inner state is returned
    bit-identical — as long as fewer than ``max_consecutive_skips`` steps in a row have been bad
    before it. Once that many bad steps came in a row, further bad steps are *propagated*: the inner
    update is applied as is (non-finite values and all), surfacing a diverged run instead of hiding
    it; a finite step resets the streak. ``max_consecutive_skips=None`` never propagates (torch's
    ``GradScaler`` behaviour); default 5. The inner update runs under ``lax.cond`` only on steps
    that are not skipped. Counters saturate at the int32 maximum.

    Optax: ``optax.apply_if_finite(opt, max_consecutive_errors)`` (same rule; it names the counters
    ``notfinite_count``/``total_notfinite``). torch: ``GradScaler.step`` skips ``optimizer.step()``
    on non-finite gradients.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.skip_nonfinite(gradtx.scale_by_learning_rate(1.0))
        >>> u, state = tx.update(jnp.array([jnp.nan, 1.0]), tx.init(jnp.zeros(2)))
        >>> u.tolist(), bool(state.skipped), int(state.total_skips), int(state.inner_state.count)
        ([0.0, 0.0], True, 1, 0)
    """

    inner: Any = option()
    max_consecutive_skips: Any = hyperparameter(5, integer=True, low=0, allow_none=True)

    def _check(self):
        _check_member("skip_nonfinite", self.inner, "inner")

    def init(self, params):
        # one fresh buffer per field: a shared one could not be donated with the state
        return SkipNonfiniteState(self.inner.init(params), numerics.init_count(),
                                  numerics.init_count(), jnp.zeros((), bool))

    def update(self, updates, state, params=None, **extra):
        finite = all_finite(updates)
        if self.max_consecutive_skips is None:
            skip = ~finite
        else:
            skip = ~finite & (state.consecutive_nonfinite < self.max_consecutive_skips)

        new_updates, inner_state = update_if(~skip, self.inner, updates, state.inner_state, params,
                                             extra)
        streak = jnp.where(finite, jnp.zeros((), jnp.int32),
                           numerics.safe_increment(state.consecutive_nonfinite))
        total = jnp.where(skip, numerics.safe_increment(state.total_skips), state.total_skips)
        return new_updates, SkipNonfiniteState(inner_state, streak, total, skip)


# --------------------------------------------------------------------------------------------
# lookahead


class LookaheadState(NamedTuple):
    """State of :class:`lookahead`: ``count`` (int32 updates so far), ``slow`` (the slow weights),
    ``inner_state`` (the fast optimizer's state)."""

    count: jax.Array
    slow: Any
    inner_state: Any


@transform
class lookahead(Transform):
    """Lookahead (Zhang et al. 2019): fast weights explore, slow weights follow every ``sync_period`` steps.

    The parameters you hold and pass are the *fast* weights; the *slow* weights live in the state
    (initialised to the parameters given to ``init``). Each update ``t = 1, 2, ...``:

    - the fast step: ``u = inner(g)``, ``fast = p + u`` (rounded as :func:`gradtx.apply_updates` does);
    - if ``t`` is a multiple of ``sync_period`` (k): ``slow ← slow + α (fast - slow)`` and the
      returned update is ``slow - p``, so that ``apply_updates`` moves the parameters to the new slow
      weights (the paper's "fast ← slow"; equal up to one rounding of ``p + (slow - p)``);
    - otherwise the update is ``u`` and ``slow`` is unchanged.

    ``slow_step_size`` α in [0, 1] (default 0.5), ``sync_period`` k >= 1 (default 6; paper: k=5 or
    10, α=0.5 or 0.8). The inner optimizer's state is kept across syncs (not reset). ``slow_dtype``:
    the slow weights' dtype, default each parameter's dtype. Needs ``params``.

    Optax: ``optax.lookahead(fast, sync_period, slow_step_size)`` takes and returns a
    ``LookaheadParams(fast, slow)`` pair instead of plain parameters. torch: no built-in
    (``torch_optimizer.Lookahead``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.lookahead(gradtx.scale_by_learning_rate(1.0), sync_period=2)
        >>> p = jnp.zeros(1)
        >>> state = tx.init(p)
        >>> for _ in range(2):
        ...     u, state = tx.update(jnp.ones(1), state, p)
        ...     p = gradtx.apply_updates(p, u)
        >>> p.tolist(), state.slow.tolist()
        ([-1.0], [-1.0])
    """

    inner: Any = option()
    sync_period: int = hyperparameter(6, integer=True, low=1)
    slow_step_size: float = hyperparameter(0.5, low=0.0, high=1.0)
    slow_dtype: Any = option(None, kind="dtype")

    def _check(self):
        _check_member("lookahead", self.inner, "inner")

    def init(self, params):
        slow = _fresh_copy(params, lambda p: numerics.state_dtype(self.slow_dtype, p))
        return LookaheadState(numerics.init_count(), slow, self.inner.init(params))

    def update(self, updates, state, params=None, **extra):
        self.require_params(params)
        fast_updates, inner_state = call_update(self.inner, updates, state.inner_state, params,
                                                extra)
        count = numerics.safe_increment(state.count)
        sync = (count % self.sync_period) == 0
        alpha = numerics.value_at(self.slow_step_size, None)

        def one(u, p, s):
            ct = numerics.compute_dtype(jnp.result_type(p))
            fast = add_update(p, u).astype(ct)
            slow = s.astype(ct)
            new_slow = slow + alpha.astype(ct) * (fast - slow)
            to_slow = (new_slow - p.astype(ct)).astype(u.dtype)
            return jnp.where(sync, to_slow, u), jnp.where(sync, new_slow.astype(s.dtype), s)

        new_updates, slow = map_leaves(self.name, one, fast_updates, params, state.slow,
                                       names=("params", "slow"), outputs=2)
        return new_updates, LookaheadState(count, slow, inner_state)


# --------------------------------------------------------------------------------------------
# Parameter averaging


class EmaParamsState(NamedTuple):
    """State of :class:`ema_params`: ``count`` (int32 updates so far) and ``ema`` (the average)."""

    count: jax.Array
    ema: Any


@transform
class ema_params(Transform):
    """Keep an exponential moving average of the parameters in the state; updates pass unchanged.

    Put it **last** in the chain (after ``scale_by_learning_rate``), so that ``p + u`` is the new
    parameter. With ``t`` the update number (1, 2, ...) and ``x_t = p + u`` (rounded as
    :func:`gradtx.apply_updates` does)::

        ema_0 = params given to init
        ema_t = d_t · ema_{t-1} + (1 - d_t) · x_t,   d_t = decay, or min(decay, (1 + t) / (10 + t)) with warmup

    (``warmup=True`` is TensorFlow's ``ExponentialMovingAverage(num_updates=t)`` warm-up, which
    lets the average forget the initial parameters quickly.) ``decay`` in [0, 1], default 0.999,
    may be a schedule (evaluated at ``t - 1``). The average is stored in ``ema_dtype``, default the
    compute dtype of each parameter (float32 for bfloat16/float16 parameters, so small increments
    are not rounded away). Read it with :func:`averaged_params`. Needs ``params``.

    torch: ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
    (no warm-up). Optax's ``optax.ema`` averages the *updates*, not the parameters.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.chain(gradtx.scale_by_learning_rate(1.0), gradtx.ema_params(decay=0.5))
        >>> p = jnp.zeros(1)
        >>> state = tx.init(p)
        >>> u, state = tx.update(jnp.array([-2.0]), state, p)
        >>> u.tolist(), gradtx.averaged_params(state).tolist()
        ([2.0], [1.0])
    """

    decay: Any = hyperparameter(0.999, low=0.0, high=1.0, schedule=True)
    warmup: bool = option(False, kind="bool")
    ema_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return EmaParamsState(numerics.init_count(), _copy_params(params, self.ema_dtype))

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        decay = numerics.value_at(self.decay, state.count)
        count = numerics.safe_increment(state.count)
        if self.warmup:
            t = count.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))

        def one(u, p, e):
            x = add_update(p, u).astype(e.dtype)
            d = decay.astype(e.dtype)
            return d * e + (1 - d) * x

        ema = map_leaves(self.name, one, updates, params, state.ema, names=("params", "ema"))
        return updates, EmaParamsState(count, ema)


class SwaState(NamedTuple):
    """State of :class:`swa`: ``count`` (int32 updates so far), ``n_averaged`` (int32 number of
    parameter snapshots in the mean) and ``mean`` (their mean; the init parameters while empty)."""

    count: jax.Array
    n_averaged: jax.Array
    mean: Any


@transform
class swa(Transform):
    """Stochastic weight averaging: the equal-weight mean of the parameters from ``start_step`` on.

    Put it **last** in the chain. With ``t`` the update number (1, 2, ...) and ``x_t = p + u`` the
    parameters after update ``t``, the mean includes ``x_t`` for ``t = start_step,
    start_step + frequency, start_step + 2·frequency, ...``::

        mean ← mean + (x_t - mean) / n    (n = snapshots so far, this one included; the first is exact)

    Updates pass unchanged. ``start_step >= 1`` (required), ``frequency >= 1`` (default 1: every
    update; use the number of steps per epoch for torch's per-epoch SWA). Stored in ``mean_dtype``
    (default each parameter's compute dtype). Read with :func:`averaged_params` (while nothing is
    averaged yet it returns the parameters given to ``init``). Needs ``params``.

    torch: ``torch.optim.swa_utils.AveragedModel(model)`` with ``update_parameters`` called at the
    same steps (pair with a constant/cyclic learning rate, e.g. ``SWALR``); remember to recompute
    batch-norm statistics (``update_bn``) for the averaged model. Optax has no SWA.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.chain(gradtx.scale_by_learning_rate(1.0), gradtx.swa(start_step=2))
        >>> p = jnp.zeros(1)
        >>> state = tx.init(p)
        >>> for _ in range(3):
        ...     u, state = tx.update(jnp.array([-1.0]), state, p)
        ...     p = gradtx.apply_updates(p, u)
        >>> p.tolist(), gradtx.averaged_params(state).tolist()
        ([3.0], [2.5])
    """

    start_step: int = hyperparameter(integer=True, low=1)
    frequency: int = hyperparameter(1, integer=True, low=1)
    mean_dtype: Any = option(None, kind="dtype")

    def init(self, params):
        return SwaState(numerics.init_count(), numerics.init_count(),
                        _copy_params(params, self.mean_dtype))

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        count = numerics.safe_increment(state.count)
        include = (count >= self.start_step) & (((count - self.start_step) % self.frequency) == 0)
        n = jnp.where(include, numerics.safe_increment(state.n_averaged), state.n_averaged)

        def one(u, p, m):
            x = add_update(p, u).astype(m.dtype)
            new = jnp.where(n == 1, x, m + (x - m) / n.astype(m.dtype))
            return jnp.where(include, new, m)

        mean = map_leaves(self.name, one, updates, params, state.mean, names=("params", "mean"))
        return updates, SwaState(count, n, mean)


def averaged_params(state, kind: str | None = None):
    """The averaged parameters kept by :class:`ema_params` or :class:`swa` somewhere in ``state``.

    ``state`` is the state of any optimizer containing one averager (in a chain, a partition, a
    wrapper ...). With both an EMA and an SWA, pick with ``kind="ema"`` or ``kind="swa"``. The
    result has the parameters' structure and the averager's dtype (float32 for low-precision
    parameters by default); cast it for evaluation if needed.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.chain(gradtx.scale_by_learning_rate(1.0), gradtx.ema_params(0.9))
        >>> gradtx.averaged_params(tx.init({"w": jnp.ones(2)}))["w"].tolist()
        [1.0, 1.0]
    """
    kinds = {"ema": (EmaParamsState,), "swa": (SwaState,), None: (EmaParamsState, SwaState)}
    if kind not in kinds:
        raise ValueError(f"averaged_params: kind={kind!r} is not one of [None, 'ema', 'swa'].")
    types = kinds[kind]
    nodes = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, types))
             if isinstance(x, types)]
    if not nodes:
        raise ValueError("averaged_params: the state holds no "
                         + {"ema": "ema_params", "swa": "swa", None: "ema_params or swa"}[kind]
                         + " state; add gradtx.ema_params(...) or gradtx.swa(...) at the end of "
                           "the optimizer chain.")
    if len(nodes) > 1:
        raise ValueError(f"averaged_params: the state holds {len(nodes)} averagers "
                         f"({', '.join(type(n).__name__ for n in nodes)}); pick one with "
                         f"kind='ema' or kind='swa', or read its state directly.")
    node = nodes[0]
    return node.ema if isinstance(node, EmaParamsState) else node.mean


# --------------------------------------------------------------------------------------------
# freeze


class FreezeState(NamedTuple):
    """State of :class:`freeze`: the inner state over the trainable (unfrozen) parameters only."""

    inner_state: Any


@transform
class freeze(Transform):
    """Freeze the parameters selected by ``mask``: zero updates and no optimizer state for them.

    ``mask`` (True = frozen) is a tree of bools with the parameters' structure or a prefix of it, a
    callable ``params -> such a tree``, or a :mod:`gradtx.masks` selector
    (``freeze(adamw(...), gradtx.masks.paths("encoder/*"))``). ``inner`` runs on the other
    parameters only and keeps no state for frozen ones (they appear as :class:`gradtx.MaskedNode`).
    Frozen updates are zeros of the gradient's shape and dtype, so ``apply_updates`` leaves them
    unchanged. (A ``chain`` of a zeroing step and an optimizer would still allocate moments for frozen
    parameters; this wrapper does not.)

    Optax: ``optax.partition({"train": opt, "frozen": optax.set_to_zero()}, labels)``;
    torch: ``requires_grad_(False)`` / leaving them out of the optimizer.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.freeze(gradtx.scale_by_learning_rate(1.0), {"w": False, "b": True})
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> u, _ = tx.update(params, tx.init(params))
        >>> u["w"].tolist(), u["b"].tolist()
        ([-1.0, -1.0], [0.0, 0.0])
    """

    inner: Any = option()
    mask: Any = option()

    def _check(self):
        _check_member("freeze", self.inner, "inner")
        if not isinstance(self.mask, FrozenTree):
            object.__setattr__(self, "mask", _freeze_spec("freeze", "mask", self.mask, _is_bool,
                                                          "True or False"))

    def _trainable(self, tree):
        frozen = _resolve("freeze", self.mask, tree)
        return jax.tree.map(lambda m: not bool(m), frozen)

    def init(self, params):
        trainable = self._trainable(params)
        return FreezeState(self.inner.init(_select("freeze", trainable, params)))

    def update(self, updates, state, params=None, **extra):
        trainable = self._trainable(updates if params is None else params)
        sub_updates = _select("freeze", trainable, updates)
        sub_params = None if params is None else _select("freeze", trainable, params)
        new_sub, inner_state = call_update(self.inner, sub_updates, state.inner_state, sub_params,
                                           extra)
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return _merge("freeze", trainable, new_sub, zeros), FreezeState(inner_state)


# --------------------------------------------------------------------------------------------
# switch


class SwitchState(NamedTuple):
    """State of :class:`switch`: ``count`` (int32 updates so far) and both optimizers' states."""

    count: jax.Array
    first_state: Any
    second_state: Any


def _is_named(field):
    def check(x):
        return isinstance(x, tuple) and hasattr(x, "_fields") and field in x._fields
    return check


def _find_field(owner, which, state, field):
    is_node = _is_named(field)
    found = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_node)[0]
             if is_node(x)]
    if len(found) != 1:
        where_ = ", ".join(jax.tree_util.keystr(p) or "<root>" for p, _ in found)
        raise ValueError(
            f"{owner}: carry_over needs exactly one state field named {field!r} in the {which} "
            f"optimizer's state; found {len(found)}{' (' + where_ + ')' if found else ''}. "
            f"Name fields that occur once (e.g. 'mu', 'trace', 'nu').")
    return found[0][1]


def _carry(owner, pairs, first_state, second_state):
    for src, dst in pairs:
        src_node = _find_field(owner, "first", first_state, src)
        dst_node = _find_field(owner, "second", second_state, dst)
        value, target = getattr(src_node, src), getattr(dst_node, dst)
        if jax.tree.structure(value) != jax.tree.structure(target) or any(
                jnp.shape(a) != jnp.shape(b)
                for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(target))):
            raise TreeMismatchError(
                f"{owner}: carry_over ({src!r} -> {dst!r}): the first optimizer's {src!r} does not "
                f"have the structure and shapes of the second's {dst!r}; both must cover the same "
                f"parameters.")
        changes = {dst: jax.tree.map(lambda a, b: a.astype(b.dtype), value, target)}
        if dst != "count" and "count" in src_node._fields and "count" in dst_node._fields:
            # carried statistics keep their age (bias corrections, first-step rules)
            changes["count"] = jnp.asarray(src_node.count).astype(jnp.result_type(dst_node.count))
        is_node = _is_named(dst)
        second_state = jax.tree.map(
            lambda x: x._replace(**changes) if is_node(x) else x,
            second_state, is_leaf=is_node)
    return second_state


@transform
class switch(Transform):
    """Run ``first`` for the first ``switch_step`` updates, then ``second`` (e.g. Adam, then SGD).

    Updates ``1 .. switch_step`` come from ``first``; later ones from ``second``, whose state starts
    from its ``init`` (its step counts and schedules start at 0 at the switch) — exactly as running
    the two optimizers back to back. Only the active optimizer runs (``lax.cond``); both states are
    kept so the state structure never changes.

    ``carry_over`` hands state that the two share by meaning to ``second`` at the switch: a tuple
    whose items are a field name (same name on both sides, e.g. ``"mu"``) or a pair
    ``(first_field, second_field)`` (e.g. ``("mu", "trace")``: Adam's first moment becomes the
    momentum buffer of :func:`gradtx.trace`). Fields are NamedTuple fields found anywhere in each
    optimizer's state and must occur exactly once there with matching structure and shapes; values
    are cast to the second's dtypes. When both NamedTuples holding the fields also have a ``count``
    field, the count is carried with them (the statistics keep their age: Adam's bias correction,
    ``trace``'s first-step rule). Default ``()``: reset (second starts fresh).

    Optax: no equivalent (``optax.join_schedules`` only joins schedules); torch: build a second
    optimizer at step N by hand.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.switch(gradtx.scale_by_learning_rate(1.0), gradtx.scale_by_learning_rate(0.5),
        ...                    switch_step=1)
        >>> state = tx.init(jnp.zeros(1))
        >>> u1, state = tx.update(jnp.ones(1), state)
        >>> u2, state = tx.update(jnp.ones(1), state)
        >>> u1.tolist(), u2.tolist()
        ([-1.0], [-0.5])
    """

    first: Any = option()
    second: Any = option()
    switch_step: int = hyperparameter(integer=True, low=0)
    carry_over: tuple = option(())

    def _check(self):
        _check_member("switch", self.first, "first")
        _check_member("switch", self.second, "second")
        items = self.carry_over
        if isinstance(items, str):
            items = (items,)
        if not isinstance(items, (tuple, list)):
            raise TypeError(f"switch: carry_over={self.carry_over!r}; expected a tuple of field "
                            f"names or (first_field, second_field) pairs, e.g. (('mu', 'trace'),).")
        pairs = []
        for item in items:
            if isinstance(item, str):
                pairs.append((item, item))
            elif (isinstance(item, (tuple, list)) and len(item) == 2
                  and all(isinstance(x, str) for x in item)):
                pairs.append((item[0], item[1]))
            else:
                raise TypeError(f"switch: carry_over item {item!r} is neither a field name nor a "
                                f"(first_field, second_field) pair of strings.")
        object.__setattr__(self, "carry_over", tuple(pairs))

    def init(self, params):
        return SwitchState(numerics.init_count(), self.first.init(params),
                           self.second.init(params))

    def update(self, updates, state, params=None, **extra):
        use_first = state.count < self.switch_step

        def run_first(first_state, second_state):
            new_updates, first_state = call_update(self.first, updates, first_state, params,
                                                   extra)
            return new_updates, first_state, second_state

        def run_second(first_state, second_state):
            if self.carry_over:
                carried = _carry("switch", self.carry_over, first_state, second_state)
                at_switch = state.count == self.switch_step
                second_state = jax.tree.map(lambda c, s: jnp.where(at_switch, c, s), carried,
                                            second_state)
            new_updates, second_state = call_update(self.second, updates, second_state, params,
                                                    extra)
            return new_updates, first_state, second_state

        new_updates, first_state, second_state = jax.lax.cond(
            use_first, run_first, run_second, state.first_state, state.second_state)
        return new_updates, SwitchState(numerics.safe_increment(state.count), first_state,
                                        second_state)
