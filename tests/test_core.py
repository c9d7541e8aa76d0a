"""The core protocol: base transforms, apply_updates, the combinators, values, Optax interop, errors.

Only the core modules (base, combine, tree, scaling) are exercised here; the few test-only
primitives below are written with the public ``gradtx.transform`` machinery, exactly as a user
would write a new primitive.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.tree import map_leaves


# ---------------------------------------------------------------------------------------------
# Test-only primitives (module level, so they are hashable values like the library's own)

class AccumulateState(NamedTuple):
    total: Any


@gradtx.transform
class accumulate(gradtx.Transform):
    """Test primitive: output the running (decayed) sum of the updates; per-leaf state."""

    decay: float = gradtx.hyperparameter(1.0, low=0.0, high=1.0)

    def init(self, params):
        return AccumulateState(gradtx.tree.zeros_like(params))

    def update(self, updates, state, params=None, **extra):
        del params, extra
        new = map_leaves(self.name, lambda u, t: (t * self.decay + u).astype(u.dtype), updates,
                         state.total, names=("total",))
        return new, AccumulateState(new)


@gradtx.transform
class add_params(gradtx.Transform):
    """Test primitive that reads the parameters: ``u + p``."""

    def init(self, params):
        del params
        return gradtx.EmptyState()

    def update(self, updates, state, params=None, **extra):
        del extra
        self.require_params(params)
        return map_leaves(self.name, lambda u, p: u + p, updates, params, names=("params",)), state


@gradtx.transform
class scale_by_extra(gradtx.Transform):
    """Test primitive that reads an extra keyword argument ``factor`` (default 1)."""

    def init(self, params):
        del params
        return gradtx.EmptyState()

    def update(self, updates, state, params=None, factor=1.0, **extra):
        del params, extra
        return jax.tree.map(lambda u: u * factor, updates), state


def select_matrices(params):
    """A named mask function: True for leaves with two or more dimensions."""
    return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)


def label_by_rank(params):
    """A named label function: 'matrix' or 'vector' by rank."""
    return jax.tree.map(lambda p: "matrix" if len(jnp.shape(p)) >= 2 else "vector", params)


def double(updates, params):
    del params
    return jax.tree.map(lambda u: 2 * u, updates)


def _params():
    return {"w": jnp.array([1.0, -2.0, 3.0]), "m": jnp.arange(6.0).reshape(2, 3)}


def _tolist(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


# ---------------------------------------------------------------------------------------------
# apply_updates


def test_apply_updates_adds_and_keeps_param_dtype():
    params = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    updates = {"a": jnp.full(2, 0.5, jnp.float32), "b": jnp.full(2, -0.5, jnp.float32)}
    new = gradtx.apply_updates(params, updates)
    assert new["a"].dtype == jnp.float32 and new["b"].dtype == jnp.bfloat16
    assert new["a"].tolist() == [1.5, 1.5] and new["b"].astype(jnp.float32).tolist() == [0.5, 0.5]


def test_apply_updates_rounds_once_for_low_precision_params():
    # 1 + (2^-8 + 2^-20) is just above the bf16 half-way point 1 + 2^-8: rounding the sum once gives
    # 1 + 2^-7; rounding the update to bf16 first (2^-8) gives a tie that rounds to even, i.e. 1.
    p = jnp.ones((), jnp.bfloat16)
    u = jnp.asarray(2.0 ** -8 + 2.0 ** -20, jnp.float32)
    assert float(gradtx.apply_updates(p, u)) == 1.0 + 2.0 ** -7


def test_apply_updates_skips_none_leaves():
    new = gradtx.apply_updates({"a": jnp.ones(1), "b": None}, {"a": jnp.ones(1), "b": None})
    assert new["b"] is None and new["a"].tolist() == [2.0]


# ---------------------------------------------------------------------------------------------
# identity, set_to_zero, stateless


def test_identity_and_set_to_zero():
    g = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    u, s = gradtx.identity().update(g, gradtx.identity().init(g))
    assert u["w"] is g["w"] and s == gradtx.EmptyState()
    u, s = gradtx.set_to_zero().update(g, gradtx.set_to_zero().init(g))
    assert u["w"].dtype == jnp.bfloat16 and u["w"].tolist() == [0.0, 0.0]
    assert jax.tree.leaves(s) == []


def test_stateless_passes_params_and_has_no_state():
    seen = []

    def record(updates, params):
        seen.append(params)
        return jax.tree.map(lambda u, p: u * p, updates, params)

    tx = gradtx.stateless(record)
    u, s = tx.update(jnp.array([2.0]), tx.init(jnp.ones(1)), jnp.array([3.0]))
    assert u.tolist() == [6.0] and seen[0].tolist() == [3.0] and s == gradtx.EmptyState()
    with pytest.raises(TypeError, match="not callable"):
        gradtx.stateless(3.0)
    assert gradtx.stateless(double) == gradtx.stateless(double)
    assert repr(gradtx.stateless(double)) == "stateless(fn=double)"


# ---------------------------------------------------------------------------------------------
# chain and named_chain


def test_chain_applies_in_order():
    p, g = jnp.array([3.0]), jnp.array([1.0])
    first = gradtx.chain(gradtx.scale(2.0), add_params())      # 2g + p
    second = gradtx.chain(add_params(), gradtx.scale(2.0))     # 2(g + p)
    assert first.update(g, first.init(p), p)[0].tolist() == [5.0]
    assert second.update(g, second.init(p), p)[0].tolist() == [8.0]


def test_chain_state_is_tuple_of_member_states_and_updates_it():
    params = _params()
    tx = gradtx.chain(accumulate(), gradtx.scale_by_learning_rate(0.5))
    state = tx.init(params)
    assert isinstance(state, tuple) and len(state) == 2
    assert isinstance(state[0], AccumulateState) and isinstance(state[1], gradtx.ScheduleState)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(g, state)
    u, state = tx.update(g, state)
    assert u["w"].tolist() == [-1.0, -1.0, -1.0]          # -0.5 * (1 + 1)
    assert int(state[1].count) == 2
    assert state[0].total["m"].tolist() == [[2.0] * 3] * 2


def test_empty_chain_is_identity_and_nested_chains_compose():
    g = jnp.array([1.0, 2.0])
    empty = gradtx.chain()
    assert empty.init(g) == () and empty.update(g, ())[0] is g
    nested = gradtx.chain(gradtx.chain(gradtx.scale(2.0), gradtx.scale(3.0)), gradtx.scale(0.5))
    flat = gradtx.chain(gradtx.scale(2.0), gradtx.scale(3.0), gradtx.scale(0.5))
    assert nested.update(g, nested.init(g))[0].tolist() == flat.update(g, flat.init(g))[0].tolist()
    assert nested != flat


def test_chain_rejects_wrong_state_and_non_transforms():
    tx = gradtx.chain(accumulate(), gradtx.scale(1.0))
    with pytest.raises(gradtx.TreeMismatchError, match="chain of 2 transforms"):
        tx.update(jnp.ones(1), (AccumulateState(jnp.zeros(1)),))
    with pytest.raises(TypeError, match="argument 1 is 3.0"):
        gradtx.chain(gradtx.scale(1.0), 3.0)

    class Unhashable:
        __hash__ = None

        def init(self, params):
            return ()

        def update(self, updates, state, params=None):
            return updates, state

    with pytest.raises(TypeError, match="not hashable"):
        gradtx.chain(Unhashable())


def test_chain_forwards_extra_kwargs_to_every_member():
    tx = gradtx.chain(scale_by_extra(), gradtx.scale(1.0), scale_by_extra())
    u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)), factor=3.0)
    assert u.tolist() == [9.0]
    u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)), factor=3.0, unknown_kwarg="x")
    assert u.tolist() == [9.0]


def test_named_chain_keys_state_by_name_and_matches_chain():
    params = _params()
    g = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    named = gradtx.named_chain(("acc", accumulate(0.5)), ("lr", gradtx.scale_by_learning_rate(0.1)))
    plain = gradtx.chain(accumulate(0.5), gradtx.scale_by_learning_rate(0.1))
    sn, sp = named.init(params), plain.init(params)
    assert set(sn) == {"acc", "lr"}
    for _ in range(3):
        un, sn = named.update(g, sn)
        up, sp = plain.update(g, sp)
        assert _tolist(un) == _tolist(up)
    assert _tolist(sn["acc"].total) == _tolist(sp[0].total)
    with pytest.raises(gradtx.TreeMismatchError, match="no entry 'lr'"):
        named.update(g, {"acc": sn["acc"]})


def test_named_chain_validates_members():
    with pytest.raises(ValueError, match="'a' is used twice"):
        gradtx.named_chain(("a", gradtx.scale(1.0)), ("a", gradtx.scale(2.0)))
    with pytest.raises(TypeError, match="pair"):
        gradtx.named_chain(gradtx.scale(1.0))
    with pytest.raises(TypeError, match="member 'x'"):
        gradtx.named_chain(("x", "not a transform"))


# ---------------------------------------------------------------------------------------------
# masked


def test_masked_applies_inner_to_selected_leaves_only():
    params = _params()
    tx = gradtx.masked(accumulate(), {"w": False, "m": True})
    state = tx.init(params)
    assert isinstance(state, gradtx.MaskedState)
    assert isinstance(state.inner_state.total["w"], gradtx.MaskedNode)   # no state kept for "w"
    assert state.inner_state.total["m"].shape == (2, 3)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(g, state)
    u, state = tx.update(g, state)
    assert u["w"].tolist() == [1.0, 1.0, 1.0]                      # passed through, not zeroed
    assert u["m"].tolist() == [[2.0] * 3] * 2


def test_masked_prefix_callable_and_array_masks_agree():
    params = {"enc": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": jnp.ones(3)}
    g = jax.tree.map(lambda p: 2 * p, params)
    full = {"enc": {"w": True, "b": True}, "head": False}
    prefix = {"enc": True, "head": False}
    arrays = {"enc": {"w": np.bool_(True), "b": jnp.array(True)}, "head": np.array(False)}
    results = []
    for mask in (full, prefix, arrays):
        tx = gradtx.masked(gradtx.scale(0.0), mask)
        results.append(_tolist(tx.update(g, tx.init(params))[0]))
    assert results[0] == results[1] == results[2]
    assert results[0]["head"] == [2.0] * 3 and results[0]["enc"]["b"] == [0.0, 0.0]
    # The mask is stored as plain Python bools: hashable, no arrays inside.
    tx = gradtx.masked(gradtx.scale(0.0), arrays)
    assert all(type(x) is bool for x in tx.mask.leaves)
    assert hash(tx) == hash(gradtx.masked(gradtx.scale(0.0), full))
    assert tx == gradtx.masked(gradtx.scale(0.0), full)


def test_masked_with_callable_mask_and_params():
    params = _params()
    tx = gradtx.masked(add_params(), select_matrices)
    g = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    assert u["m"].tolist() == params["m"].tolist() and u["w"].tolist() == [0.0] * 3
    assert repr(tx) == "masked(add_params(), mask=select_matrices)"


def test_masked_bad_masks():
    with pytest.raises(TypeError, match=r"\['w'\]"):
        gradtx.masked(gradtx.scale(1.0), {"w": 1.0})
    tx = gradtx.masked(gradtx.scale(1.0), {"w": True, "x": False})
    with pytest.raises(gradtx.TreeMismatchError, match="masked"):
        tx.init(_params())

    class UnhashableFn:
        __hash__ = None

        def __call__(self, params):
            return True

    with pytest.raises(TypeError, match="unhashable"):
        gradtx.masked(gradtx.scale(1.0), UnhashableFn())


# ---------------------------------------------------------------------------------------------
# partition


def test_partition_routes_each_group_and_keeps_group_state():
    params = _params()
    tx = gradtx.partition({"vector": accumulate(), "matrix": gradtx.set_to_zero()},
                          {"w": "vector", "m": "matrix"})
    state = tx.init(params)
    assert isinstance(state, gradtx.PartitionState)
    assert set(state.inner_states) == {"vector", "matrix"}
    assert isinstance(state.inner_states["vector"].total["m"], gradtx.MaskedNode)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(g, state)
    u, state = tx.update(g, state)
    assert u["w"].tolist() == [2.0] * 3 and u["m"].tolist() == [[0.0] * 3] * 2


def test_partition_callable_labels_and_params():
    params = _params()
    tx = gradtx.partition({"matrix": add_params(), "vector": gradtx.scale(-1.0)}, label_by_rank)
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    assert u["w"].tolist() == [-1.0] * 3
    assert u["m"].tolist() == (params["m"] + 1.0).tolist()


def test_partition_errors_name_the_problem():
    with pytest.raises(ValueError, match="'other'"):
        tx = gradtx.partition({"a": gradtx.scale(1.0)}, {"w": "a", "m": "other"})
        tx.init(_params())
    with pytest.raises(TypeError, match="non-empty dict"):
        gradtx.partition({}, {"w": "a"})
    tx = gradtx.partition({"a": gradtx.scale(1.0)}, {"w": "a", "x": "a"})
    with pytest.raises(gradtx.TreeMismatchError, match="partition"):
        tx.init(_params())


# ---------------------------------------------------------------------------------------------
# Transforms are values: equality, hashing, repr, immutability, jit caches


def test_values_equal_hash_and_repr():
    assert gradtx.scale(2.0) == gradtx.scale(2.0) and hash(gradtx.scale(2.0)) == hash(gradtx.scale(2))
    assert gradtx.scale(2.0) != gradtx.scale(3.0)
    assert gradtx.scale(jnp.float32(2.0)) == gradtx.scale(2.0)             # no arrays kept
    assert type(gradtx.scale(jnp.asarray(2.0)).factor) is float
    assert repr(gradtx.scale(2.0)) == "scale(factor=2.0)"
    assert repr(accumulate()) == "accumulate()" and repr(accumulate(0.5)) == "accumulate(decay=0.5)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        gradtx.scale(2.0).factor = 3.0


@pytest.mark.parametrize("tx", [
    gradtx.chain(gradtx.scale(2.0), gradtx.scale_by_learning_rate(0.25)),
    gradtx.named_chain(("a", gradtx.scale(-1.0)), ("b", gradtx.identity())),
    gradtx.masked(gradtx.scale(0.0), {"w": True, "m": False}),
    gradtx.partition({"x": gradtx.set_to_zero(), "y": gradtx.scale(0.5)}, {"w": "x", "m": "y"}),
    gradtx.masked(accumulate(0.5), select_matrices),
], ids=["chain", "named_chain", "masked", "partition", "masked_fn"])
def test_repr_round_trips(tx):
    namespace = dict(vars(gradtx), accumulate=accumulate, select_matrices=select_matrices)
    rebuilt = eval(repr(tx), namespace)  # noqa: S307 - the repr is the call that built it
    assert rebuilt == tx and hash(rebuilt) == hash(tx) and repr(rebuilt) == repr(tx)


def test_equal_rebuilt_transforms_hit_the_jit_cache():
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def step(tx, g, state):
        traces.append(1)
        return tx.update(g, state)

    def build():
        return gradtx.chain(
            gradtx.masked(accumulate(0.5), {"w": True, "m": False}),
            gradtx.partition({"matrix": gradtx.scale(2.0), "vector": gradtx.identity()},
                             label_by_rank),
            gradtx.scale_by_learning_rate(0.1))

    params = _params()
    g = jax.tree.map(jnp.ones_like, params)
    tx1 = build()
    _, s = step(tx1, g, tx1.init(params))
    tx2 = build()
    assert tx2 is not tx1 and tx2 == tx1
    _, s = step(tx2, g, s)
    assert len(traces) == 1 and step._cache_size() == 1
    step(gradtx.chain(gradtx.scale(1.0)), g, ((),))
    assert len(traces) == 2


def test_validation_at_construction_names_argument_and_value():
    with pytest.raises(ValueError, match=r"scale_by_learning_rate: learning_rate=-1\.0 is out of range"):
        gradtx.scale_by_learning_rate(-1.0)
    with pytest.raises(ValueError, match="not finite"):
        gradtx.scale(float("nan"))
    with pytest.raises(TypeError, match="is a bool"):
        gradtx.scale(True)
    with pytest.raises(TypeError, match="shape"):
        gradtx.scale(jnp.ones(2))


def test_core_transforms_work_under_vmap_and_grad():
    tx = gradtx.chain(accumulate(0.5), gradtx.scale_by_learning_rate(0.5))
    gs = jnp.arange(6.0).reshape(3, 2)

    def one(g):
        u, _ = tx.update(g, tx.init(g))
        return u

    assert jax.vmap(one)(gs).tolist() == (-0.5 * gs).tolist()
    assert jax.grad(lambda g: jnp.sum(one(g)))(jnp.ones(2)).tolist() == [-0.5, -0.5]


# ---------------------------------------------------------------------------------------------
# Optax interoperability (Optax is an oracle/test dependency only; gradtx never imports it)


@pytest.fixture
def optax():
    mod = pytest.importorskip("optax")
    with jax.numpy_dtype_promotion("standard"):   # Optax itself is not strict-promotion clean
        yield mod


def test_gradtx_transforms_inside_optax_chain(optax):
    params = _params()
    g = jax.tree.map(lambda p: p + 1.0, params)
    ours = gradtx.chain(accumulate(0.5), gradtx.scale_by_learning_rate(0.1))
    mixed = optax.chain(accumulate(0.5), gradtx.scale_by_learning_rate(0.1))
    so, sm = ours.init(params), mixed.init(params)
    for _ in range(3):
        uo, so = ours.update(g, so)
        um, sm = mixed.update(g, sm, params, some_unknown_kwarg=1.0)
        assert _tolist(uo) == _tolist(um)


def test_optax_transforms_inside_gradtx_chain(optax):
    params = _params()
    ours = gradtx.chain(optax.scale_by_adam(), gradtx.scale_by_learning_rate(0.1))
    ref = optax.adam(0.1)
    so, sr = ours.init(params), ref.init(params)
    p_ours = p_ref = params
    loss = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["m"] ** 2)
    for _ in range(5):
        uo, so = ours.update(jax.grad(loss)(p_ours), so, p_ours, value=1.0)
        ur, sr = ref.update(jax.grad(loss)(p_ref), sr, p_ref)
        p_ours = gradtx.apply_updates(p_ours, uo)
        p_ref = optax.apply_updates(p_ref, ur)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_ours, p_ref)


def test_optax_transforms_inside_partition_and_masked(optax):
    params = _params()
    g = jax.tree.map(jnp.ones_like, params)
    tx = gradtx.partition({"matrix": optax.scale(-2.0), "vector": gradtx.scale(3.0)},
                          label_by_rank)
    u, _ = tx.update(g, tx.init(params), params)
    assert u["m"].tolist() == [[-2.0] * 3] * 2 and u["w"].tolist() == [3.0] * 3
    tx = gradtx.masked(optax.set_to_zero(), select_matrices)
    u, _ = tx.update(g, tx.init(params), params)
    assert u["m"].tolist() == [[0.0] * 3] * 2 and u["w"].tolist() == [1.0] * 3


def test_extra_kwargs_reach_only_members_that_accept_them(optax):
    received = []

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_with_extra(updates, state, params=None, **extra):
        received.append(dict(extra))
        return updates, state

    def update_without_extra(updates, state, params=None):
        return jax.tree.map(lambda u: -u, updates), state

    accepts = optax.GradientTransformationExtraArgs(init_fn, update_with_extra)
    rejects = optax.GradientTransformation(init_fn, update_without_extra)
    tx = gradtx.chain(rejects, accepts, scale_by_extra())
    u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)), factor=4.0)
    assert u.tolist() == [-4.0]
    assert received == [{"factor": 4.0}]
    # The same holds inside partition and masked.
    tx = gradtx.partition({"a": rejects, "b": scale_by_extra()}, {"x": "a", "y": "b"})
    g = {"x": jnp.ones(1), "y": jnp.ones(1)}
    u, _ = tx.update(g, tx.init(g), factor=5.0)
    assert u["x"].tolist() == [-1.0] and u["y"].tolist() == [5.0]
    tx = gradtx.masked(rejects, {"x": True, "y": False})
    u, _ = tx.update(g, tx.init(g), factor=5.0)
    assert u["x"].tolist() == [-1.0]


# ---------------------------------------------------------------------------------------------
# Errors: tree mismatches name the transform and the first differing path; params=None


def test_tree_mismatch_names_transform_and_first_differing_path():
    tx = accumulate()
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(gradtx.TreeMismatchError) as info:
        tx.update({"a": jnp.ones(2), "c": jnp.ones(2)}, state)
    msg = str(info.value)
    assert "accumulate" in msg and "['c']" in msg and "['b']" in msg

    nested = {"layer": {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2))}}
    state = tx.init(nested)
    wrong = {"layer": {"bias": jnp.ones(2), "weight": jnp.ones((2, 2))}}
    with pytest.raises(gradtx.TreeMismatchError, match=r"\['layer'\]\['weight'\]"):
        tx.update(wrong, state)
    with pytest.raises(gradtx.TreeMismatchError, match="extra leaf"):
        tx.update({"layer": {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2)),
                             "z": jnp.ones(1)}}, state)


def test_tree_mismatch_inside_chain_names_the_member():
    tx = gradtx.chain(gradtx.scale(2.0), accumulate())
    state = tx.init([jnp.ones(2), jnp.ones(3)])
    with pytest.raises(gradtx.TreeMismatchError, match="accumulate"):
        tx.update([jnp.ones(2)], state)


def test_shape_and_dtype_mismatch_errors():
    tx = accumulate()
    state = tx.init({"w": jnp.ones((2, 3))})
    with pytest.raises(gradtx.TreeMismatchError, match=r"accumulate.*\['w'\].*\(3, 2\).*\(2, 3\)"):
        tx.update({"w": jnp.ones((3, 2))}, state)
    with pytest.raises(TypeError, match=r"accumulate.*\['w'\].*int32"):
        tx.update({"w": jnp.ones((2, 3), jnp.int32)}, state)


def test_params_none_raises_naming_the_transform():
    tx = gradtx.chain(gradtx.scale(1.0), add_params())
    state = tx.init(jnp.ones(2))
    with pytest.raises(ValueError, match=r"add_params\(\).*params") as info:
        tx.update(jnp.ones(2), state)
    assert "params=None" in str(info.value)
    with pytest.raises(ValueError, match="add_params"):
        tx.update(jnp.ones(2), state, params=None)
    # With params it works.
    assert tx.update(jnp.ones(2), state, jnp.full(2, 2.0))[0].tolist() == [3.0, 3.0]
