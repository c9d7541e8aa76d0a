"""Subprocess half of tests/reliability/test_checkpoints.py (run as a script, not collected).

    python checkpoint_runner.py save    OUT_DIR NAME...   # run, checkpoint mid-run, run on
    python checkpoint_runner.py restore OUT_DIR NAME...   # fresh process: restore and run on

``save`` runs every named optimizer (reliability_common.OPTIMIZERS) for ``K`` jitted steps, saves
``{"params", "state"}`` with ``flax.serialization.to_bytes`` (one file per optimizer) and with
orbax-checkpoint's ``StandardCheckpointer`` (one checkpoint holding all of them), then keeps going
for ``M`` more steps and writes the final ``{"params", "state"}`` (the uninterrupted run).
``restore`` (a new process) rebuilds each optimizer by name, restores both checkpoints into the
abstract target ``jax.eval_shape(tx.init, params)``, runs the same ``M`` steps and writes the
results. Failures are recorded per optimizer in ``errors-<mode>.json`` instead of aborting the
batch. Both processes share a persistent compilation cache, so the fresh process does not pay
for compiling the same steps again.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402

from reliability_common import OPTIMIZERS, make_params, make_step  # noqa: E402

K, M = 3, 3


def _orbax():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _write(path, tree):
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(tree))


def _target(tx):
    return {"params": jax.eval_shape(make_params),
            "state": jax.eval_shape(tx.init, make_params())}


def _continue(step, tree):
    params = jax.tree.map(jnp.asarray, tree["params"])
    state = jax.tree.map(jnp.asarray, tree["state"])
    for _ in range(M):
        params, state, _ = step(params, state)
    return {"params": params, "state": state}


def save(out, names):
    errors, mid = {}, {}
    for name in names:
        try:
            tx = OPTIMIZERS[name]()
            step = jax.jit(make_step(tx))
            params = make_params()
            state = tx.init(params)
            for _ in range(K):
                params, state, _ = step(params, state)
            mid[name] = {"params": params, "state": state}
            _write(os.path.join(out, f"{name}.mid.msgpack"), mid[name])
            _write(os.path.join(out, f"{name}.final.msgpack"), _continue(step, mid[name]))
        except Exception:  # noqa: BLE001 - reported per optimizer by the test
            errors[name] = traceback.format_exc()
            mid.pop(name, None)
    checkpointer = _orbax()
    try:        # one checkpoint for all optimizers (fast) ...
        checkpointer.save(os.path.join(out, "orbax", "all"), mid)
        checkpointer.wait_until_finished()
    except Exception:  # noqa: BLE001 - ... else one per optimizer, to name the culprits
        for name, tree in mid.items():
            try:
                checkpointer.save(os.path.join(out, "orbax", name), tree)
                checkpointer.wait_until_finished()
            except Exception:  # noqa: BLE001
                errors[f"{name}/orbax"] = traceback.format_exc()
    return errors


def restore(out, names):
    errors, targets, steps = {}, {}, {}
    for name in names:
        tx = OPTIMIZERS[name]()
        steps[name] = jax.jit(make_step(tx))
        targets[name] = _target(tx)
        try:
            with open(os.path.join(out, f"{name}.mid.msgpack"), "rb") as f:
                restored = serialization.from_bytes(targets[name], f.read())
            _write(os.path.join(out, f"{name}.flax.resumed.msgpack"),
                   _continue(steps[name], restored))
        except Exception:  # noqa: BLE001
            errors[f"{name}/flax"] = traceback.format_exc()
    checkpointer = _orbax()
    combined = os.path.join(out, "orbax", "all")
    restored_all = checkpointer.restore(combined, targets) if os.path.exists(combined) else {}
    for name in names:
        try:
            restored = restored_all.get(name) or checkpointer.restore(
                os.path.join(out, "orbax", name), targets[name])
            _write(os.path.join(out, f"{name}.orbax.resumed.msgpack"),
                   _continue(steps[name], restored))
        except Exception:  # noqa: BLE001
            errors[f"{name}/orbax"] = traceback.format_exc()
    return errors


def main(argv):
    mode, out, names = argv[0], argv[1], argv[2:]
    cache = os.path.join(out, "jax-cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    errors = (save if mode == "save" else restore)(out, names)
    with open(os.path.join(out, f"errors-{mode}.json"), "w") as f:
        json.dump(errors, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
