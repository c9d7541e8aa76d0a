"""Shared pieces of the reliability suite: the optimizers under test, a parameter tree, gradients.

``OPTIMIZERS`` maps a name to a zero-argument builder. It holds every entry of the conformance
registry (tests/optimizer_registry.py: every alias and the composed optimizers) plus one case per
wrapper of gradtx/wrappers.py and ``reduce_on_plateau``, so the reliability tests cover "every
optimizer and every wrapper" from one list. Builders are plain named functions so that a
subprocess can rebuild exactly the same optimizer by name (tests/reliability/test_checkpoints.py).

Every optimizer here is called as ``tx.update(grads, state, params, value=loss)``: params are
always given (some need them) and ``value`` feeds ``reduce_on_plateau`` (the others ignore it).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import gradtx  # noqa: E402
from exact_checks import tree_bits_equal  # noqa: E402,F401  (re-exported for the suite)
from optimizer_registry import ENTRIES, select_matrices  # noqa: E402

g = gradtx


def _wrappers():
    sched = g.schedules.warmup_cosine(peak_value=0.1, warmup_steps=2, decay_steps_after_warmup=20)
    return {
        "inject_adamw": lambda: g.inject_hyperparams(g.adamw(0.1, weight_decay=1e-3)),
        "accumulate_adam": lambda: g.accumulate_gradients(g.adam(0.1), every_k=2),
        "skip_nonfinite_sgdm": lambda: g.skip_nonfinite(g.sgd(0.05, momentum=0.9)),
        "lookahead_adam": lambda: g.lookahead(g.adam(0.05), sync_period=3, slow_step_size=0.5),
        "ema_params_adam": lambda: g.chain(g.adam(0.05), g.ema_params(0.9)),
        "swa_sgd": lambda: g.chain(g.sgd(0.05), g.swa(start_step=2)),
        "freeze_matrices_adam": lambda: g.freeze(g.adam(0.05), select_matrices),
        "switch_adam_sgd": lambda: g.switch(g.adam(0.05), g.sgd(0.05, momentum=0.9),
                                            switch_step=3, carry_over=(("mu", "trace"),)),
        "plateau_adam": lambda: g.chain(g.adam(0.05), g.reduce_on_plateau(patience=1,
                                                                          factor=0.5)),
        "warmup_cosine_adamw": lambda: g.adamw(sched, weight_decay=1e-2),
    }


def _entry_builder(entry):
    return lambda: entry.make()


OPTIMIZERS = {e.name: _entry_builder(e) for e in ENTRIES}
OPTIMIZERS.update(_wrappers())
OPTIMIZER_NAMES = sorted(OPTIMIZERS)

def make_params(dtype=jnp.float32):
    """A small two-leaf tree: a vector and a matrix (as the registry's quadratic problem)."""
    return {"w": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32).astype(dtype),
            "m": jnp.linspace(0.25, 1.5, 12, dtype=jnp.float32).reshape(3, 4).astype(dtype)}


def loss_fn(params):
    """A smooth non-quadratic loss (float32), so that successive gradients differ."""
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(params):
        x = x.astype(jnp.float32)
        total = total + jnp.sum(jnp.sin(2.0 * x) * x * x) + 0.5 * jnp.sum(x * x)
    return total


def make_step(tx):
    """One training step ``(params, state) -> (params, state, loss)`` (not jitted)."""
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return gradtx.apply_updates(params, updates), state, loss
    return step

