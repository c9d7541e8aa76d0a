"""Every optimizer and wrapper can have its params and state donated together.

A state leaf that *is* a parameter array (``astype`` to the same dtype returns its input) makes
``jax.jit(step, donate_argnums=(0, 1))`` fail with "donate the same buffer twice", and a state
that shares a buffer with the params would be clobbered by the in-place update. So: ``init``
returns fresh buffers for every state leaf, and a donated step consumes every param and state
buffer and runs again on its own outputs.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from reliability_common import OPTIMIZERS, OPTIMIZER_NAMES, make_params, make_step  # noqa: E402

EXTRA = {
    "master_weights_adamw": (lambda: gradtx.master_weights(gradtx.adamw(0.05)), jnp.bfloat16),
    "lookahead_bf16": (lambda: gradtx.lookahead(gradtx.sgd(0.05), sync_period=2), jnp.bfloat16),
    "ema_params_f32_store": (lambda: gradtx.chain(gradtx.sgd(0.05),
                                                  gradtx.ema_params(0.9, ema_dtype="float32")),
                             jnp.float32),
    "flatten_adamw": (lambda: gradtx.flatten(gradtx.adamw(0.05)), jnp.float32),
    "quantized_adamw": (lambda: gradtx.quantized_state(gradtx.adamw(0.05), min_size=1),
                        jnp.float32),
    "quantized_adamw_float8": (lambda: gradtx.quantized_state(gradtx.adamw(0.05), min_size=1,
                                                              code_map="float8"), jnp.float32),
    "loss_scaled_sgd": (lambda: gradtx.dynamic_loss_scale(gradtx.sgd(0.05)), jnp.float32),
}
CASES = [pytest.param(OPTIMIZERS[n], jnp.float32, id=n) for n in OPTIMIZER_NAMES] + \
        [pytest.param(make, dtype, id=n) for n, (make, dtype) in EXTRA.items()]


def _pointers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) if x.size]


@pytest.mark.parametrize("make,dtype", CASES)
def test_params_and_state_donate_together(make, dtype):
    tx = make()
    params = make_params(dtype)
    state = tx.init(params)
    shared = set(_pointers(params)) & set(_pointers(state))
    assert not shared, f"{tx!r}: init returned a state leaf that is a parameter's own buffer"
    own = _pointers(state)
    assert len(set(own)) == len(own), f"{tx!r}: two state leaves share one buffer"

    step = make_step(tx)
    jitted = jax.jit(lambda p, s: step(p, s)[:2], donate_argnums=(0, 1))
    new_params, new_state = jitted(params, state)
    # 0-d flags and counters that the step never reads are pruned from the program (nothing to
    # donate); every array the step reads must be consumed
    consumed = [x for x in jax.tree.leaves((params, state)) if x.ndim]
    assert all(x.is_deleted() for x in consumed), f"{tx!r}: a donated buffer was not reused"
    new_params, new_state = jitted(new_params, new_state)      # runs again on its own outputs
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
               for x in jax.tree.leaves(new_params))
