"""Checkpoints (issue 4 §2): save mid-run, restore in a fresh process, continue bit-identically.

For every optimizer and wrapper of reliability_common.OPTIMIZERS, one subprocess
(checkpoint_runner.py ``save``) runs K jitted steps, saves ``{"params", "state"}`` with
``flax.serialization`` (msgpack) and with orbax-checkpoint, and runs M more steps (the
uninterrupted run); a second, fresh subprocess (``restore``) rebuilds the optimizer by name,
restores both checkpoints into ``jax.eval_shape(tx.init, params)`` and runs the same M steps. The
two final ``{"params", "state"}`` must be bit-identical. All optimizers are batched into the two
subprocesses.

The pinned fixture (fixtures/state_v0.1.msgpack, written by make_fixtures.py) is the state format
of this version (docs/state_format.md): restoring it into today's abstract state must keep
working, with the same tree, shapes and dtypes, and continue with the pinned next update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reliability_common import (OPTIMIZER_NAMES, OPTIMIZERS, loss_fn, make_params,  # noqa: E402
                                tree_bits_equal)

pytest.importorskip("orbax.checkpoint")

FIXTURE = os.path.join(HERE, "fixtures", "state_v0.1.msgpack")


def _run_runner(mode, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE))] + env.get("PYTHONPATH", "").split(os.pathsep))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(HERE, "checkpoint_runner.py"), mode, str(out),
         *OPTIMIZER_NAMES],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{mode} subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    with open(os.path.join(out, f"errors-{mode}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    save_errors = _run_runner("save", out)
    restore_errors = _run_runner("restore", out)
    return out, save_errors, restore_errors


def _load(path):
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


@pytest.mark.parametrize("fmt", ["flax", "orbax"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_restored_in_fresh_process_continues_bit_identically(runs, name, fmt):
    out, save_errors, restore_errors = runs
    for errors in (save_errors, restore_errors):
        for key in (name, f"{name}/{fmt}"):
            assert key not in errors, f"{key}:\n{errors[key][-1500:]}"
    uninterrupted = _load(os.path.join(out, f"{name}.final.msgpack"))
    resumed = _load(os.path.join(out, f"{name}.{fmt}.resumed.msgpack"))
    assert tree_bits_equal(resumed, uninterrupted), (
        f"{name}: resuming from the {fmt} checkpoint diverged from the uninterrupted run")


# ------------------------------------------------------------------------------------------------
# The pinned format


@pytest.fixture(scope="module")
def pinned():
    with open(FIXTURE, "rb") as f:
        return f.read()


def test_fixture_covers_every_optimizer(pinned):
    raw = serialization.msgpack_restore(pinned)
    assert sorted(raw) == OPTIMIZER_NAMES, (
        "the optimizer list changed: add the new optimizer to the fixture with make_fixtures.py "
        "(keeping every existing entry unchanged)")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_pinned_state_restores_and_continues(pinned, name):
    raw = serialization.msgpack_restore(pinned)[name]
    tx = OPTIMIZERS[name]()
    abstract = jax.eval_shape(tx.init, make_params())
    # the saved tree has exactly today's layout: same nested names, shapes and dtypes
    expected = serialization.to_state_dict(abstract)
    assert jax.tree.structure(raw["state"]) == jax.tree.structure(expected), (
        f"{name}: the state layout changed; old checkpoints no longer restore "
        f"(see docs/state_format.md)")
    for saved, want in zip(jax.tree.leaves(raw["state"]), jax.tree.leaves(expected)):
        assert (np.shape(saved), np.asarray(saved).dtype) == (want.shape, want.dtype)
    state = jax.tree.map(jnp.asarray, serialization.from_state_dict(abstract, raw["state"]))
    params = jax.tree.map(jnp.asarray, serialization.from_state_dict(make_params(), raw["params"]))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, state, params, value=loss)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(raw["next_updates"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-7)
