"""Regenerate the pinned checkpoint fixture of tests/reliability/test_checkpoints.py.

    cd <repo> && JAX_PLATFORMS=cpu python tests/reliability/make_fixtures.py

Writes ``tests/reliability/fixtures/state_v0.1.msgpack``: for every optimizer of
``reliability_common.OPTIMIZERS``, ``{"params", "state", "next_updates"}`` after two jitted steps
on ``make_params()`` (the state as ``flax.serialization.to_bytes`` writes it; ``next_updates`` is the
third step's update, used to check that the restored state continues correctly). The file pins
the on-disk state format of gradtx 0.1 (docs/state_format.md): regenerate it **only** when the
format changes on purpose, bump the file name's version, keep the old file and say so in
CHANGELOG.md, since users' checkpoints written by the old version stop restoring.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402

from reliability_common import (OPTIMIZER_NAMES, OPTIMIZERS, loss_fn, make_params,  # noqa: E402
                                make_step)

FIXTURE = os.path.join(HERE, "fixtures", "state_v0.1.msgpack")


def snapshot(name):
    tx = OPTIMIZERS[name]()
    step = jax.jit(make_step(tx))
    params = make_params()
    state = tx.init(params)
    for _ in range(2):
        params, state, _ = step(params, state)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, state, params, value=loss)
    return {"params": params, "state": state, "next_updates": updates}


def main():
    tree = {name: snapshot(name) for name in OPTIMIZER_NAMES}
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "wb") as f:
        f.write(serialization.to_bytes(tree))
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes, {len(tree)} optimizers)")


if __name__ == "__main__":
    main()
