"""Fuzz every public factory with arbitrary argument values (issue 4 §2, "bad input, at construction").

Factories are discovered, not listed: every :class:`gradtx.Transform` subclass exported from
``gradtx`` (primitives, combinators, wrappers), every optimizer alias in ``gradtx.optimizers``,
every :class:`gradtx.schedules.Schedule` in ``gradtx.schedules``, ``gradtx.from_torch`` (one
factory per supported torch optimizer, its arguments from ``TORCH_DEFAULTS``) and
``gradtx.schedules.from_torch`` (one per supported scheduler). Arguments come from
``inspect.signature``. A factory gets a valid baseline call (required arguments from ``BASELINE``)
and hypothesis replaces one or two of its arguments by arbitrary values: ints, floats (NaN, ±Inf,
negative, huge, subnormal), bools, strings, None, arrays, tuples, dicts, callables, transforms.

The contract checked for every draw: the call either

* raises ``ValueError``/``TypeError`` whose message names a replaced argument — at construction,
  or (for arguments that can only be checked against the parameters, such as masks and labels)
  at ``init``/``update``; or
* builds an object that works: a transform's ``init``/``update`` run on a small finite tree
  (gradients with an exact zero) and give finite updates and a NaN-free state; a schedule gives a
  finite float32 value at steps 0 .. int32 max.

Never another exception type, never NaN.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from gradtx import schedules  # noqa: E402
from gradtx.base import Transform  # noqa: E402

g = gradtx
EXAMPLES = 6


# ------------------------------------------------------------------------------------------------
# Discovery


def _transform_classes():
    found = {}
    for name in dir(gradtx):
        obj = getattr(gradtx, name)
        if isinstance(obj, type) and issubclass(obj, Transform) and obj is not Transform:
            found[obj.__name__] = obj
    return found


def _aliases():
    return {name: getattr(gradtx.optimizers, name) for name in gradtx.optimizers.__all__}


def _schedule_classes():
    out = {}
    for name in schedules.__all__:
        obj = getattr(schedules, name)
        if isinstance(obj, type) and issubclass(obj, schedules.Schedule) \
                and obj is not schedules.Schedule:
            out[name] = obj
    return out


@dataclasses.dataclass(frozen=True)
class Factory:
    """One public factory: ``call(**kwargs)`` builds it; ``args`` are its argument names."""

    name: str
    kind: str                       # "transform" or "schedule"
    call: object
    args: tuple                     # fuzzable argument names (a "*" prefix: a variadic member)
    baseline: tuple                 # ((arg, value), ...) of a valid call

    def build(self, kwargs):
        positional = [kwargs[a] for a in self.args if a.startswith("*")]
        named = {k: v for k, v in kwargs.items() if not k.startswith("*")}
        return self.call(*positional, **named)

    def __repr__(self):
        return self.name


def _centre(updates, params):
    """A named (hashable) function for ``stateless``."""
    del params
    return jax.tree.map(lambda u: u - jnp.mean(u), updates)


def _half(count):
    """A valid schedule: a named function of the step."""
    del count
    return jnp.asarray(0.5, jnp.float32)


MASK = {"w": True, "m": False}

#: Valid values for arguments without a default, by argument name (then per-factory overrides).
BASELINE = {
    "factor": 0.5, "learning_rate": 0.1, "step_size_fn": schedules.constant(0.1),
    "max_delta": 1.0, "max_norm": 1.0, "threshold": 1.0, "fn": _centre,
    "inner": g.scale_by_adam(), "mask": MASK, "every_k": 2, "start_step": 1,
    "first": g.adam(0.1), "second": g.sgd(0.1), "switch_step": 2,
    "transforms": {"a": g.adam(0.1), "b": g.sgd(0.1)}, "labels": {"w": "a", "m": "b"},
    "value": 0.5, "init_value": 1.0, "end_value": 0.1, "transition_steps": 10, "power": 2.0,
    "decay_rate": 0.5, "values": (1.0, 0.5), "boundaries": (3,), "step_size": 3,
    "milestones": (2, 5), "decay_steps": 10, "peak_value": 1.0, "warmup_steps": 3,
    "decay_steps_after_warmup": 10, "stable_steps": 3, "decay_steps_after_stable": 5,
    "total_steps": 20, "base_value": 0.1, "max_value": 1.0, "step_size_up": 4,
    "first_period": 5,
    "schedules": (schedules.constant(1.0), schedules.linear(1.0, 0.0, 5)),
}
OVERRIDES = {
    "piecewise_constant": {"values": (1.0, 0.5), "boundaries": (3,)},
    "chain": {"*0": g.scale(1.0), "*1": g.adam(0.1)},
    "named_chain": {"*0": ("a", g.scale(1.0)), "*1": ("b", g.adam(0.1))},
}

#: Baselines of gradtx.schedules.from_torch, per scheduler (lr is fuzzed too).
TORCH_SCHEDULERS = {
    "StepLR": dict(step_size=3, gamma=0.5),
    "MultiStepLR": dict(milestones=[2, 5], gamma=0.5),
    "ExponentialLR": dict(gamma=0.9),
    "CosineAnnealingLR": dict(T_max=10, eta_min=0.01),
    "CosineAnnealingWarmRestarts": dict(T_0=5, T_mult=2, eta_min=0.0),
    "OneCycleLR": dict(max_lr=1.0, total_steps=20, pct_start=0.3),
    "LinearLR": dict(start_factor=0.5, end_factor=1.0, total_iters=5),
    "PolynomialLR": dict(total_iters=5, power=2.0),
    "ConstantLR": dict(factor=0.5, total_iters=5),
    "CyclicLR": dict(base_lr=0.1, max_lr=1.0, step_size_up=4),
    "SequentialLR": dict(schedulers=[("LinearLR", {"start_factor": 0.5, "total_iters": 2}),
                                     ("ExponentialLR", {"gamma": 0.9})], milestones=[2]),
}


def _signature_factory(name, kind, call):
    sig = inspect.signature(call)
    args, baseline = [], []
    extra = OVERRIDES.get(name.split(".")[-1], {})
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            members = sorted(k for k in extra if k.startswith("*"))
            args += members
            baseline += [(m, extra[m]) for m in members]
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        args.append(p.name)
        if p.name in extra:
            baseline.append((p.name, extra[p.name]))
        elif p.default is inspect.Parameter.empty:
            baseline.append((p.name, BASELINE[p.name]))   # KeyError: add a baseline above
    return Factory(name, kind, call, tuple(args), tuple(baseline))


def discover():
    factories = []
    for name, cls in sorted(_transform_classes().items()):
        factories.append(_signature_factory(name, "transform", cls))
    for name, fn in sorted(_aliases().items()):
        factories.append(_signature_factory(name, "transform", fn))
    for name, cls in sorted(_schedule_classes().items()):
        factories.append(_signature_factory(f"schedules.{name}", "schedule", cls))
    from gradtx.porting import TORCH_DEFAULTS
    for opt, defaults in TORCH_DEFAULTS.items():
        def call(_opt=opt, **kw):
            return gradtx.from_torch(_opt, **kw)
        factories.append(Factory(f"from_torch[{opt}]", "transform", call, tuple(defaults),
                                 (("lr", 0.1),)))
    for sched, base in TORCH_SCHEDULERS.items():
        def call(_s=sched, **kw):
            return schedules.from_torch(_s, **kw)
        factories.append(Factory(f"schedules.from_torch[{sched}]", "schedule", call,
                                 ("lr",) + tuple(base), (("lr", 0.5),) + tuple(base.items())))
    return factories


FACTORIES = discover()
IDS = [f.name for f in FACTORIES]


# ------------------------------------------------------------------------------------------------
# Running what was built


def _params():
    return {"w": jnp.asarray([0.5, -1.0, 0.0, 2.0], jnp.float32),
            "m": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)}


def _grads(k):
    # finite, with an exact zero coordinate (an unused parameter: adaptive denominators see 0)
    return {"w": jnp.asarray([0.25, -0.5, 0.0, 1.0], jnp.float32) * (k + 1),
            "m": jnp.linspace(-2.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)}


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def exercise(obj, kind):
    """Run what a factory built; return a description of a non-finite result, or None."""
    if kind == "schedule":
        for step in (0, 1, 7, 1000, 2**31 - 1):
            v = obj(step)
            if v.dtype != jnp.float32 or not bool(jnp.isfinite(v)):
                return f"schedule value {v!r} at step {step}"
        return None
    params = _params()
    state = obj.init(params)
    for k in range(2):
        updates, state = obj.update(_grads(k), state, params, value=jnp.float32(1.0 - k))
        for leaf in _float_leaves(updates):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                return f"non-finite update {leaf!r} at step {k}"
        for leaf in _float_leaves(state):
            if bool(jnp.any(jnp.isnan(leaf))):
                return f"NaN in the state {leaf!r} at step {k}"
        params = gradtx.apply_updates(params, updates)
    return None


# ------------------------------------------------------------------------------------------------
# Arbitrary values


def _flat_numbers(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _flat_numbers(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _flat_numbers(item)]
    if isinstance(x, (bool, np.bool_)):
        return []
    if isinstance(x, (int, float, np.number)):
        return [x]
    if isinstance(x, (np.ndarray, jax.Array)) and x.size == 1 and \
            np.issubdtype(np.asarray(x).dtype, np.number):
        return [np.asarray(x).item()]
    return []


def _moderate(values) -> bool:
    """All numbers drawn are of ordinary magnitude (products of two of them fit in float32)."""
    for v in values:
        for x in _flat_numbers(v):
            if isinstance(x, complex):
                continue
            x = float(x)
            if not math.isfinite(x) or abs(x) > 1e6 or (x != 0 and abs(x) < 1e-6):
                return False
    return True


POOL = [
    0, 1, -1, 2, 3, 7, 128, 2**31 - 1, 2**31, -(2**40), 10**400,
    0.0, -0.0, 0.5, 1.0, -0.5, 0.999, 1.5, 4.0, 1e-8, 1e-30, 5e-324, 1e6, 1e30, 1e300, -1e300,
    math.nan, math.inf, -math.inf, 1 + 2j,
    True, False, None,
    "", "abc", "float32", "int32", "bfloat16", "lamb", "lars", "min", "cos", "linear", "mu",
    np.ones(3), np.array(0.5), np.float32(0.25), np.array(2), np.array(True), np.array([0.5]),
    jnp.asarray(0.5, jnp.float32), jnp.asarray([1.0, 2.0]), jnp.int32(3), np.float64(math.nan),
    (), (1, 2), (0.5,), (2, 1), (0.5, 0.5, 0.5), ("a", "b"), ("mu", "trace"), (("mu", "trace"),),
    [], [1, 2],
    {}, {"w": True, "m": False}, {"w": True}, {"w": "a", "m": "b"}, {"a": g.scale(1.0)},
    _half, schedules.constant(0.25), schedules.linear(1.0, 0.0, 5), len, object(), object,
    g.scale(1.0), g.scale_by_adam(), g.adam(0.1), ("a", g.scale(1.0)), jnp.float32,
]

values = st.one_of(
    st.sampled_from(POOL),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.tuples(st.sampled_from([0, 1, 2, 0.5, -1, "a", None, math.nan])),
)


def _names_argument(message: str, replaced) -> bool:
    for arg in replaced:
        if arg.startswith("*"):
            if f"argument {arg[1:]}" in message or "member" in message:
                return True
        elif arg in message:
            return True
    return False


def _check_factory(factory, data):
    n = data.draw(st.integers(1, min(2, len(factory.args))), label="how many")
    replaced = data.draw(st.lists(st.sampled_from(factory.args), min_size=n, max_size=n,
                                  unique=True), label="arguments")
    kwargs = dict(factory.baseline)
    drawn = {}
    for arg in replaced:
        drawn[arg] = kwargs[arg] = data.draw(values, label=arg)
    where = "construction"
    try:
        obj = factory.build(kwargs)
        where = "init/update"
        problem = exercise(obj, factory.kind)
    except (ValueError, TypeError) as e:
        assert _names_argument(str(e), replaced), (
            f"{factory.name}({drawn}) raised at {where} {type(e).__name__}: {e} -- the message "
            f"does not name the argument {replaced}")
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{factory.name}({drawn}) raised {type(e).__name__} at {where} "
                             f"(expected ValueError/TypeError or success): {e}") from e
    if problem is None:
        return
    if _moderate(drawn.values()):
        raise AssertionError(f"{factory.name}({drawn}) was accepted but gave {problem}")
    # Huge or tiny values may overflow float32 (a documented consequence of asking for them),
    # but must never produce NaN.
    assert "nan" not in problem.lower(), (
        f"{factory.name}({drawn}) was accepted but gave {problem}")


# ------------------------------------------------------------------------------------------------
# Tests


def test_discovery_finds_every_kind_of_factory():
    names = set(IDS)
    for expected in ("scale_by_adam", "chain", "partition", "skip_nonfinite", "inject_hyperparams",
                     "switch", "adamw", "lion", "adafactor", "schedules.warmup_cosine",
                     "schedules.join", "from_torch[Adam]", "schedules.from_torch[OneCycleLR]"):
        assert expected in names
    assert len(_aliases()) >= 17 and len(_schedule_classes()) >= 15
    assert len(_transform_classes()) >= 35


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_baseline_builds_and_runs(factory):
    obj = factory.build(dict(factory.baseline))
    assert exercise(obj, factory.kind) is None


FUZZABLE = [f for f in FACTORIES if f.args]


@pytest.mark.parametrize("factory", FUZZABLE, ids=[f.name for f in FUZZABLE])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_arbitrary_arguments_fail_loudly_or_work(factory, data):
    _check_factory(factory, data)


# Targeted cases the random draws may miss: each must raise ValueError/TypeError naming the
# argument (they are the classic ways a float32 optimizer silently breaks).
TARGETED = [
    ("scale_by_adam", "eps", math.nan), ("scale_by_adam", "b1", 1.0), ("scale_by_adam", "b2", -0.1),
    ("scale_by_adam", "mu_dtype", "int32"), ("scale_by_adam", "amsgrad", 1),
    ("scale_by_learning_rate", "learning_rate", -0.1), ("trace", "decay", math.inf),
    ("clip_by_global_norm", "max_norm", -1.0), ("accumulate_gradients", "every_k", 0),
    ("accumulate_gradients", "every_k", 1.5), ("skip_nonfinite", "inner", None),
    ("adamw", "weight_decay", -1.0), ("adamw", "learning_rate", "0.1"), ("sgd", "momentum", 2.0),
    ("schedules.warmup_cosine", "warmup_steps", -1), ("schedules.cosine", "decay_steps", 0),
    ("lookahead", "slow_step_size", 1.5), ("masked", "mask", {"w": 1.0, "m": True}),
]


@pytest.mark.parametrize("factory_name,arg,value", TARGETED,
                         ids=[f"{f}-{a}-{v!r}" for f, a, v in TARGETED])
def test_targeted_bad_arguments_raise_naming_the_argument(factory_name, arg, value):
    factory = FACTORIES[IDS.index(factory_name)]
    kwargs = dict(factory.baseline)
    kwargs[arg] = value
    with pytest.raises((ValueError, TypeError)) as info:
        obj = factory.build(kwargs)
        exercise(obj, factory.kind)
    assert arg in str(info.value)
