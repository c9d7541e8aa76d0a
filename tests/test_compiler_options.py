"""``gradtx.compiler_options``: what it returns, and that it removes buffer copies without changing
a single bit of any registry optimizer's trajectory."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from exact_checks import array_copies, tree_bits_equal  # noqa: E402
from optimizer_registry import ENTRIES, ENTRY_IDS, PROBLEMS  # noqa: E402

CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are CPU options")


def test_values_per_backend():
    assert gradtx.compiler_options("cpu") == CPU_OPTIONS
    assert gradtx.compiler_options("CPU") == CPU_OPTIONS
    for name in ("gpu", "cuda", "rocm", "tpu"):
        assert gradtx.compiler_options(name) == {}
    assert gradtx.compiler_options() == gradtx.compiler_options(jax.default_backend())


def test_returns_a_fresh_dict():
    options = gradtx.compiler_options("cpu")
    options["xla_cpu_copy_insertion_use_region_analysis"] = False
    assert gradtx.compiler_options("cpu") == CPU_OPTIONS


def test_bad_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"backend='metal'.*'cpu'"):
        gradtx.compiler_options("metal")
    with pytest.raises(TypeError, match=r"backend=3 must be a string"):
        gradtx.compiler_options(3)


def _loss(params):
    """A smooth non-quadratic loss whose gradient comes out of a matrix product, as in a real model
    (an elementwise loss lets XLA recompute the gradient inside the update loops, which reads the
    old params after they are written and forces a copy whatever the options)."""
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(params):
        x = x.astype(jnp.float32)
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        mix = jnp.cos(jnp.arange(rows.shape[1] ** 2, dtype=jnp.float32)).reshape(rows.shape[1], -1)
        total = total + jnp.sum(jnp.tanh(rows @ mix) ** 2)
    return total


def _train_step(tx):
    def step(params, state):
        grads = jax.grad(_loss)(params)
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state
    return step


def _trajectory(tx, params, options, steps=3):
    step = jax.jit(_train_step(tx), donate_argnums=(0, 1), compiler_options=options)
    params = jax.tree.map(jnp.copy, params)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(jax.tree.map(np.asarray, (params, state)))
    return out


@on_cpu
@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_options_change_no_bit_of_any_registry_trajectory(entry):
    dtype = jnp.bfloat16 if entry.supports_bf16_convergence else jnp.float32
    params = PROBLEMS["quadratic"].init(dtype)
    tx = entry.make("quadratic")
    plain = _trajectory(tx, params, None)
    fast = _trajectory(tx, params, gradtx.compiler_options("cpu"))
    assert len(plain) == len(fast)
    for step, (a, b) in enumerate(zip(plain, fast)):
        assert tree_bits_equal(a, b), f"{entry.name}: step {step + 1} differs with the options"


_TREE = {"w": (96, 64), "b": (64,), "k": (3, 8, 8)}


@on_cpu
@pytest.mark.parametrize("make", [
    lambda: gradtx.lion(1e-4, weight_decay=0.1),
    lambda: gradtx.adamw(1e-3, mu_dtype=jnp.bfloat16),
    lambda: gradtx.lamb(1e-3),
    lambda: gradtx.chain(gradtx.clip_by_global_norm(1.0), gradtx.adamw(1e-3)),
    lambda: gradtx.sgd(1e-2, momentum=0.9, nesterov=True),
], ids=["lion", "adamw_bf16_mu", "lamb", "clipped_adamw", "sgd_nesterov"])
def test_train_step_updates_donated_buffers_in_place(make):
    tx = make()
    params = {k: jnp.ones(s, jnp.float32) for k, s in _TREE.items()}
    state = tx.init(params)
    lowered = jax.jit(_train_step(tx), donate_argnums=(0, 1)).lower(params, state)
    copies = array_copies(lowered.compile(gradtx.compiler_options("cpu")).as_text())
    assert copies == [], "the compiled step copies donated buffers:\n" + "\n".join(copies)
