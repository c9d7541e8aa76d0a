"""Write your own gradtx primitives and chain them with the built-in ones.

    python examples/custom_optimizer.py          # ~10 s on 2 CPU cores
    python examples/custom_optimizer.py --tiny

Two new primitives:
- gradient centralisation (Yong et al. 2020: subtract from each weight matrix's gradient its mean
  over the input axis), stateless: a plain function wrapped by ``gradtx.stateless``;
- Signum (Bernstein et al. 2018: the sign of a momentum), with state: a ~15-line frozen dataclass.
  Declaring ``decay`` with ``gradtx.hyperparameter`` gives validation, a readable repr, value
  equality and hashing (equal optimizers share jit caches) for free.

They are chained with ``add_decoupled_weight_decay`` and a warm-up/cosine learning rate, and the
result is trained with a pure-JAX loop (``tx.init`` / ``tx.update`` / ``gradtx.apply_updates``
inside one ``jax.lax.scan``) on scikit-learn's digits, next to AdamW.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402,F401  (makes a checkout's gradtx importable)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gradtx  # noqa: E402


# ---------------------------------------------------------------------------------------------
# 1. A stateless primitive: one function.

def centralise(updates, params):
    """Gradient centralisation: remove the mean over the input axis of every weight matrix."""
    del params

    def one(g):
        if g.ndim < 2:
            return g                     # biases and other vectors are left alone
        return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)

    return jax.tree.map(one, updates)


# ---------------------------------------------------------------------------------------------
# 2. A primitive with state: Signum.

class ScaleBySignumState(NamedTuple):
    momentum: Any


@gradtx.transform
class scale_by_signum(gradtx.Transform):
    """``m ← decay·m + (1 − decay)·g``; the update is ``sign(m)``."""

    decay: float = gradtx.hyperparameter(0.9, low=0.0, high=1.0, high_open=True)

    def init(self, params):
        return ScaleBySignumState(gradtx.tree.zeros_like(params))

    def update(self, updates, state, params=None, **extra):
        momentum = jax.tree.map(lambda m, g: self.decay * m + (1.0 - self.decay) * g,
                                state.momentum, updates)
        return jax.tree.map(jnp.sign, momentum), ScaleBySignumState(momentum)


def signum_gc(total_steps: int) -> gradtx.Transform:
    warmup = max(1, total_steps // 10)
    return gradtx.chain(
        gradtx.stateless(centralise),
        scale_by_signum(decay=0.9),
        gradtx.add_decoupled_weight_decay(0.1, mask=gradtx.masks.decay_default()),
        gradtx.scale_by_learning_rate(gradtx.schedules.warmup_cosine(
            peak_value=1e-3, warmup_steps=warmup, decay_steps_after_warmup=total_steps - warmup)),
    )


# ---------------------------------------------------------------------------------------------
# 3. A pure-JAX training loop: the whole run is one jitted lax.scan.

def init_mlp(key, sizes=(64, 128, 10)):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out), jnp.float32) / np.sqrt(n_in),
            "bias": jnp.zeros(n_out, jnp.float32)}
    return params


def apply_mlp(params, x):
    layers = list(params.values())
    for layer in layers[:-1]:
        x = jax.nn.gelu(x @ layer["kernel"] + layer["bias"][None, :])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"][None, :]


def loss_fn(params, x, y):
    return _common.cross_entropy(apply_mlp(params, x), y)


@functools.partial(jax.jit, static_argnames=("tx",), donate_argnames=("params",))
def train(tx, params, xs, ys):
    """Run ``len(xs)`` steps of ``tx`` on the batches ``xs, ys``; return params and losses.

    ``params`` is donated: its buffers become the returned parameters, so pass a copy to keep the
    originals. The optimizer state is created and updated inside the scan, in place.
    """

    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        return (gradtx.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
    return params, losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default 1500 (50 with --tiny)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (50 if args.tiny else 1500)

    tx = signum_gc(steps)
    print("our optimizer:")
    print(_common.pretty_repr(tx, width=96, indent="    "))
    print("equal values are equal (and hash equally, so jit reuses the compiled step):",
          tx == signum_gc(steps) and hash(tx) == hash(signum_gc(steps)))
    try:
        scale_by_signum(decay=1.5)
    except ValueError as e:
        print(f"validation for free: {e}")

    x_train, y_train, x_test, y_test = _common.load_digits_split()
    idx = _common.batches(len(x_train), 64, steps)
    xs, ys = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
    params0 = init_mlp(jax.random.key(0))
    print(f"\n{'optimizer':<22}{'final loss (mean of last 10%)':>32}{'test accuracy':>16}")
    for name, opt in (("AdamW", gradtx.adamw(1e-3, weight_decay=1e-2)),
                      ("centralised Signum", tx)):
        params, losses = train(opt, jax.tree.map(jnp.copy, params0), xs, ys)  # params0 is kept
        tail = float(jnp.mean(losses[-max(1, steps // 10):]))
        acc = float(jnp.mean((jnp.argmax(apply_mlp(params, jnp.asarray(x_test)), -1)
                              == jnp.asarray(y_test)).astype(jnp.float32)))
        print(f"{name:<22}{tail:>32.4f}{100 * acc:>15.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
