"""Bad input at update time (issue 4 §2): errors name the transform and the path.

For every optimizer and wrapper of the reliability list (reliability_common.OPTIMIZERS, built on
tests/optimizer_registry.py): gradient trees that do not match the state, shape mismatches,
integer gradients, complex gradients where a transform does not support them and ``params=None``
where params are needed raise ``ValueError``/``TypeError`` (``TreeMismatchError`` is a
``ValueError``) whose message names a transform of the optimizer and the offending path —
eagerly and under ``jit`` (the checks run at trace time).
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from reliability_common import OPTIMIZER_NAMES, OPTIMIZERS, make_params  # noqa: E402

by_optimizer = pytest.mark.parametrize("name", OPTIMIZER_NAMES)


def _transform_names(tx) -> set:
    """Every transform class named in the optimizer's repr (its members, recursively)."""
    return set(re.findall(r"\b([a-z_][a-z0-9_]*)\(", repr(tx))) - {"float"}


def _assert_names_transform(tx, message: str):
    names = _transform_names(tx)
    assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in names), (
        f"the error does not name any transform of {tx!r}: {message}")


def _grads(params):
    return jax.tree.map(lambda p: (jnp.cos(p.astype(jnp.float32)) + 0.5).astype(p.dtype), params)


def _update(tx, grads, state, params, jit):
    def run(grads, state, params):
        return tx.update(grads, state, params, value=jnp.float32(1.0))
    return (jax.jit(run) if jit else run)(grads, state, params)


def _expect(tx, exc, grads, state, params, jit, path=None):
    with pytest.raises(exc) as info:
        _update(tx, grads, state, params, jit)
    message = str(info.value)
    _assert_names_transform(tx, message)
    if path is not None:
        assert path in message, f"the error does not name the path {path}: {message}"
    return message


def _holds_per_parameter_state(state, shape) -> bool:
    return any(jnp.shape(x) == shape for x in jax.tree.leaves(state))


def _reads_params(tx, params, state) -> bool:
    try:
        tx.update(_grads(params), state, None, value=jnp.float32(1.0))
    except ValueError:
        return True
    return False


def _can_check_structure(tx, params, state) -> bool:
    """The optimizer keeps per-parameter state or reads params, so it can see a mismatch."""
    return _holds_per_parameter_state(state, (4,)) or _reads_params(tx, params, state)


@by_optimizer
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_extra_leaf_names_transform_and_path(name, jit):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    grads = dict(_grads(params), z=jnp.ones(2, jnp.float32))
    if not _can_check_structure(tx, params, state):
        pytest.skip("no per-parameter state and no params read: the update is a pure function "
                    "of the gradient (plain SGD / signSGD)")
    _expect(tx, ValueError, grads, state, params, jit, path="['z']")


@by_optimizer
def test_missing_leaf_names_transform_and_path(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    grads = {"m": _grads(params)["m"]}        # 'w' is missing
    if not _can_check_structure(tx, params, state):
        pytest.skip("no per-parameter state and no params read")
    _expect(tx, ValueError, grads, state, params, jit=False, path="['w']")


@by_optimizer
def test_shape_mismatch_names_transform_and_path(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    grads = dict(_grads(params), w=jnp.ones(5, jnp.float32))    # params['w'] has shape (4,)
    if _can_check_structure(tx, params, state):
        _expect(tx, ValueError, grads, state, params, jit=False, path="['w']")
    else:
        # Nothing per parameter to compare against (e.g. plain SGD): the update is a pure
        # function of the gradient and keeps its shape.
        updates, _ = _update(tx, grads, state, params, jit=False)
        assert jnp.shape(updates["w"]) == (5,)


@by_optimizer
@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_integer_gradients_raise_type_error(name, dtype):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    grads = dict(_grads(params), w=jnp.ones(4, dtype))
    message = _expect(tx, TypeError, grads, state, params, jit=False, path="['w']")
    assert dtype in message


@by_optimizer
def test_complex_gradients_work_or_raise_naming_the_path(name):
    """Complex parameters: supported (finite complex updates) or a TypeError naming the leaf."""
    tx = OPTIMIZERS[name]()
    real = make_params()
    params = dict(real, w=jax.lax.complex(real["w"], real["w"][::-1]))
    grads = dict(_grads(real), w=jax.lax.complex(jnp.cos(real["w"]), jnp.full(4, -0.5, jnp.float32)))
    try:
        state = tx.init(params)
        updates, state = _update(tx, grads, state, params, jit=False)
    except TypeError as e:
        _assert_names_transform(tx, str(e))
        assert "['w']" in str(e) and "complex" in str(e), str(e)
        return
    assert updates["w"].dtype == jnp.complex64
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["lion", "sign_sgd"])
def test_sign_based_reject_complex(name):
    tx = OPTIMIZERS[name]()
    params = {"w": jnp.ones(3, jnp.complex64)}
    with pytest.raises(TypeError, match=r"\['w'\]"):
        tx.update({"w": jnp.ones(3, jnp.complex64)}, tx.init(params), params)


@by_optimizer
def test_params_none_raises_naming_transform_or_works(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)
    try:
        updates, _ = _update(tx, _grads(params), state, None, jit=False)
    except ValueError as e:
        _assert_names_transform(tx, str(e))
        assert "params" in str(e)
        return
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["lookahead_adam", "ema_params_adam", "swa_sgd", "adamw",
                                  "lamb", "lars", "adafactor"])
def test_params_none_raises_where_params_are_needed(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    with pytest.raises(ValueError, match="params"):
        _update(tx, _grads(params), tx.init(params), None, jit=True)


@by_optimizer
def test_state_of_another_tree_is_rejected(name):
    """A state initialised for other parameters fails (naming the path), not silently."""
    tx = OPTIMIZERS[name]()
    params = make_params()
    other = dict(params, extra=jnp.ones(3, jnp.float32))
    state = tx.init(other)
    if not any(jnp.shape(x) == (3,) for x in jax.tree.leaves(state)) \
            and not _reads_params(tx, params, tx.init(params)):
        pytest.skip("no per-parameter state and no params read: nothing to mismatch")
    message = _expect(tx, ValueError, _grads(params), state, params, jit=False)
    assert "['extra']" in message, message


def test_errors_are_the_documented_types():
    assert issubclass(gradtx.TreeMismatchError, ValueError)
    # a value-level sanity check that the suite really exercised something
    assert len(OPTIMIZER_NAMES) >= 30
    assert np.all([callable(OPTIMIZERS[n]) for n in OPTIMIZER_NAMES])
