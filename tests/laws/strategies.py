"""Hypothesis strategies and comparison helpers shared by the law tests (tests/laws/).

Random pytrees are nested dicts, lists and tuples whose leaves have random shapes (scalars and
empty arrays included) and a chosen floating dtype. Leaf values come from a seeded NumPy generator
(cheaper than drawing every element through hypothesis, and still shrinkable through the seed).
float64 trees only exist inside ``jax.enable_x64(True)``: use :func:`dtype_context`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import gradtx

# ------------------------------------------------------------------------------------------------
# dtypes

LOW_DTYPES = ("float32", "bfloat16", "float16")
ALL_DTYPES = LOW_DTYPES + ("float64",)

dtypes = st.sampled_from(ALL_DTYPES)
dtypes_no_f64 = st.sampled_from(LOW_DTYPES)
# dtypes with the float32 exponent range (scaling by a power of two is exact, no subnormals)
wide_exponent_dtypes = st.sampled_from(("float32", "bfloat16", "float64"))


def dtype_context(dtype: str):
    """``jax.enable_x64(True)`` for float64, else a no-op: x64 is never switched on globally."""
    if dtype == "float64":
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def eps_of(dtype) -> float:
    return float(jnp.finfo(jnp.dtype(dtype)).eps)


# ------------------------------------------------------------------------------------------------
# tree structures

SHAPES = [(), (1,), (3,), (0,), (2, 3), (0, 2), (3, 1), (2, 1, 2)]
NONEMPTY_SHAPES = [s for s in SHAPES if 0 not in s]

shapes = st.sampled_from(SHAPES)
nonempty_shapes = st.sampled_from(NONEMPTY_SHAPES)


def structures(leaf=shapes, max_leaves: int = 5):
    """A nested dict/list/tuple whose leaves are shapes (tuples of ints wrapped in ``Shape``)."""
    base = leaf.map(Shape)
    return st.recursive(
        base,
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from("abcdw"), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple)),
        max_leaves=max_leaves)


class Shape(tuple):
    """A shape used as a tree leaf (a marker type so that jax does not flatten it)."""


def _is_shape(x):
    return isinstance(x, Shape)


def leaf_shapes(structure):
    return jax.tree.leaves(structure, is_leaf=_is_shape)


def fill(structure, dtype, rng: np.random.Generator, *, low: float = 0.0, high: float = 3.0,
         zeros: float = 0.0):
    """Arrays shaped by ``structure``: magnitudes uniform in [low, high], random signs.

    ``zeros`` is the probability that an element is exactly 0.
    """

    def one(shape):
        mag = rng.uniform(low, high, size=shape)
        sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
        x = mag * sign
        if zeros:
            x = np.where(rng.uniform(size=shape) < zeros, 0.0, x)
        return jnp.asarray(x, jnp.dtype(dtype))

    return jax.tree.map(one, structure, is_leaf=_is_shape)


@st.composite
def problems(draw, dtype: str | None = None, *, steps=(1, 4), leaf=shapes, max_leaves=5,
             low=0.0, high=3.0, zeros=0.1):
    """``(dtype, params, [grads_1, ..., grads_n])`` for a random structure (float64 only under x64).

    The trees are built lazily by :func:`Problem.build` so that float64 arrays are made inside
    :func:`dtype_context`.
    """
    dt = draw(dtypes) if dtype is None else dtype
    structure = draw(structures(leaf, max_leaves))
    n = draw(st.integers(*steps))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return Problem(dt, structure, n, seed, low, high, zeros)


class Problem:
    """A random optimisation problem: params and a gradient sequence, built on demand."""

    def __init__(self, dtype, structure, steps, seed, low, high, zeros):
        self.dtype, self.structure, self.steps, self.seed = dtype, structure, steps, seed
        self.low, self.high, self.zeros = low, high, zeros

    def build(self):
        rng = np.random.default_rng(self.seed)
        params = fill(self.structure, self.dtype, rng, low=0.1, high=2.0)
        grads = [fill(self.structure, self.dtype, rng, low=self.low, high=self.high,
                      zeros=self.zeros) for _ in range(self.steps)]
        return params, grads

    def __repr__(self):
        return (f"Problem(dtype={self.dtype}, structure={self.structure!r}, steps={self.steps}, "
                f"seed={self.seed})")


# ------------------------------------------------------------------------------------------------
# Random transforms (a pool of primitives with random valid hyperparameters)

unit = st.floats(0.0, 0.99)
positive = st.floats(1e-3, 10.0)


def _specs():
    """Strategies of ``(name, kwargs)`` specs; ``build(spec)`` makes the transform."""
    return [
        st.tuples(st.just("identity"), st.fixed_dictionaries({})),
        st.tuples(st.just("scale"), st.fixed_dictionaries({"factor": st.floats(-4.0, 4.0)})),
        st.tuples(st.just("scale_by_learning_rate"),
                  st.fixed_dictionaries({"learning_rate": st.floats(0.0, 2.0)})),
        st.tuples(st.just("trace"), st.fixed_dictionaries(
            {"decay": unit, "nesterov": st.booleans(), "dampening": st.floats(0.0, 0.5)})),
        st.tuples(st.just("ema"), st.fixed_dictionaries({"decay": unit, "debias": st.booleans()})),
        st.tuples(st.just("scale_by_sign"), st.fixed_dictionaries({})),
        st.tuples(st.just("scale_by_lion"), st.fixed_dictionaries({"b1": unit, "b2": unit})),
        st.tuples(st.just("scale_by_adam"), st.fixed_dictionaries(
            {"b1": unit, "b2": unit, "eps": st.floats(1e-8, 1e-2), "nesterov": st.booleans(),
             "amsgrad": st.booleans()})),
        st.tuples(st.just("scale_by_rms"), st.fixed_dictionaries(
            {"decay": unit, "eps": st.floats(1e-8, 1e-2), "eps_in_sqrt": st.booleans()})),
        st.tuples(st.just("scale_by_rss"), st.fixed_dictionaries(
            {"initial_accumulator_value": st.floats(0.0, 1.0), "eps": st.floats(1e-8, 1e-2)})),
        st.tuples(st.just("clip"), st.fixed_dictionaries({"max_delta": st.floats(0.0, 3.0)})),
        st.tuples(st.just("clip_by_global_norm"),
                  st.fixed_dictionaries({"max_norm": st.floats(0.0, 5.0)})),
        st.tuples(st.just("add_decoupled_weight_decay"),
                  st.fixed_dictionaries({"rate": st.floats(0.0, 1.0)})),
        st.tuples(st.just("scale_by_trust_ratio"),
                  st.fixed_dictionaries({"trust_coefficient": st.floats(0.1, 2.0)})),
        st.tuples(st.just("scale_by_belief"), st.fixed_dictionaries({"b1": unit, "b2": unit})),
    ]


transform_specs = st.one_of(*_specs())


def build(spec):
    name, kwargs = spec
    return getattr(gradtx, name)(**kwargs)


transforms = transform_specs.map(build)


# ------------------------------------------------------------------------------------------------
# Running and comparing

def run(tx, params, grads, *, update=None, **extra):
    """Run ``tx`` over a gradient sequence; returns ``(list of updates, list of states)``.

    ``states[0]`` is the initial state. ``update`` replaces ``tx.update`` (e.g. a jitted one).
    """
    update = tx.update if update is None else update
    state = tx.init(params)
    outs, states = [], [state]
    for g in grads:
        u, state = update(g, state, params, **extra)
        outs.append(u)
        states.append(state)
        params = gradtx.apply_updates(params, u)
    return outs, states


def _np(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bfloat16 or x.dtype == jnp.float16:
        return np.asarray(x.astype(jnp.float32), np.float64)
    return np.asarray(x)


def assert_trees_equal(a, b, *, what: str = "trees"):
    """Same structure, same dtypes and shapes, equal values (NaN equal to NaN; -0 == +0)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), \
        f"{what}: structures differ: {jax.tree.structure(a)} vs {jax.tree.structure(b)}"
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        where = f"{what} at {jax.tree_util.keystr(path)}"
        assert x.dtype == y.dtype, f"{where}: dtypes {x.dtype} vs {y.dtype}"
        assert x.shape == y.shape, f"{where}: shapes {x.shape} vs {y.shape}"
        np.testing.assert_array_equal(_np(x), _np(y), err_msg=where)


def assert_leaves_equal(a, b, *, what: str = "trees"):
    """Equal leaf sequences (structures may differ, e.g. nested vs flat chain states)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), f"{what}: {len(la)} vs {len(lb)} leaves"
    for i, (x, y) in enumerate(zip(la, lb)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, \
            f"{what} leaf {i}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        np.testing.assert_array_equal(_np(x), _np(y), err_msg=f"{what} leaf {i}")


def assert_trees_close(a, b, *, rtol: float, atol: float, what: str = "trees",
                       check_dtype: bool = True):
    """Same structure (and dtypes), values within ``atol + rtol·|b|``."""
    assert jax.tree.structure(a) == jax.tree.structure(b), \
        f"{what}: structures differ: {jax.tree.structure(a)} vs {jax.tree.structure(b)}"
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        where = f"{what} at {jax.tree_util.keystr(path)}"
        if check_dtype:
            assert x.dtype == y.dtype, f"{where}: dtypes {x.dtype} vs {y.dtype}"
        assert x.shape == y.shape, f"{where}: shapes {x.shape} vs {y.shape}"
        np.testing.assert_allclose(_np(x), _np(y), rtol=rtol, atol=atol, err_msg=where)


def structure_and_dtypes(tree):
    """The treedef with each leaf's (shape, dtype): what must not change under ``update``."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves]


def scaled(tree, c: float):
    """``c·tree`` computed in float64 on the host and rounded once to each leaf's dtype."""
    return jax.tree.map(lambda x: jnp.asarray(_np(x) * c, x.dtype), tree)


def select_list(tree, mask_tree):
    """The leaves of ``tree`` whose mask leaf is True, as a flat list (in flattening order)."""
    return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask_tree)) if m]


def map_structure(fn: Callable[[Any], Any], structure):
    return jax.tree.map(fn, structure, is_leaf=_is_shape)
