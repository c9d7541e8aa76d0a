"""Shared pieces of the multi-device check scripts (run in subprocesses, never imported by pytest
collection: the file name starts with an underscore and holds no tests)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import gradtx

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict:
    """``{op: [largest array (element count) moved by each instance]}`` in compiled HLO text.

    Combined collectives (one all-reduce of a tuple of scalars) count their largest member."""
    found = {op: [] for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                 for dims in _SHAPE.findall(m.group(1))]
        found[m.group(2)].append(max(sizes) if sizes else 0)
    return found


def make_params(seed: int = 0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return {"w1": jax.random.normal(k1, (64, 32)) * 0.2,
            "b1": jax.random.normal(k2, (32,)) * 0.1,
            "w2": jax.random.normal(k3, (32, 16)) * 0.2,
            "b2": jax.random.normal(k4, (16,)) * 0.1}


def make_batches(steps: int, batch: int = 16, seed: int = 1):
    kx, ky = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(kx, (steps, batch, 64))
    ys = jax.random.normal(ky, (steps, batch, 16))
    return np.asarray(xs), np.asarray(ys)


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    out = h @ params["w2"] + params["b2"][None, :]
    return jnp.mean((out - y) ** 2)


def optimizers():
    return {
        "adamw": gradtx.adamw(1e-2, weight_decay=1e-2),
        "lamb": gradtx.lamb(1e-2, weight_decay=1e-2),
        "lion": gradtx.lion(1e-3, weight_decay=1e-2),
        "adafactor": gradtx.adafactor(1e-2, min_dim_size_to_factor=8),
        "lars": gradtx.lars(0.1, weight_decay=1e-3, trust_coefficient=0.01),
        "clip+adamw": gradtx.chain(gradtx.clip_by_global_norm(0.1), gradtx.adamw(1e-2)),
        # 8-bit state; min_size lowered so this small model's matrices are quantized
        "adamw-8bit": gradtx.quantized_state(gradtx.adamw(1e-2, weight_decay=1e-2), min_size=256),
        # stochastic rounding (the default) compares against a uniform draw: a moment that differs
        # in its last bit (reductions summed in another order) can round to the other neighbour,
        # so the sharded run equals the single-device one only to within a code step for those
        # elements (tolerance STOCHASTIC_TOL); nearest rounding flips only at exact midpoints
        "adamw-8bit-nearest": gradtx.quantized_state(gradtx.adamw(1e-2, weight_decay=1e-2),
                                                     min_size=256, rounding="nearest"),
        # the float8 code map: the same blocks and arrays, other codes
        "adamw-8bit-float8": gradtx.quantized_state(gradtx.adamw(1e-2, weight_decay=1e-2),
                                                    min_size=256, rounding="nearest",
                                                    code_map="float8"),
    }


def make_step(tx, compute_shardings=None, grad_shardings=None, param_shardings=None):
    """A train step: loss -> grads -> tx.update -> apply. With ``grad_shardings`` the update is
    :func:`gradtx.sharding.zero_update` (ZeRO-2), the updates re-assembled as ``param_shardings``."""

    def step(params, state, x, y):
        def loss(p):
            if compute_shardings is not None:
                p = gradtx.sharding.constrain(p, compute_shardings)
            return loss_fn(p, x, y)

        grads = jax.grad(loss)(params)
        if grad_shardings is not None:
            updates, state = gradtx.sharding.zero_update(
                tx, grads, state, params, partitioned=grad_shardings,
                param_shardings=param_shardings)
        else:
            updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    return step


def reference_run(tx, params, xs, ys, device=None):
    """The unsharded single-device trajectory."""
    device = device or jax.local_devices()[0]
    params = jax.device_put(params, device)
    state = jax.jit(tx.init)(params)
    step = jax.jit(make_step(tx))
    for x, y in zip(xs, ys):
        params, state = step(params, state, jax.device_put(x, device), jax.device_put(y, device))
    return jax.tree.map(np.asarray, params)


def max_rel_err(a, b) -> float:
    errs = jax.tree.leaves(jax.tree.map(
        lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))
                           / (np.max(np.abs(np.asarray(v))) + 1e-12)), a, b))
    return max(errs)
