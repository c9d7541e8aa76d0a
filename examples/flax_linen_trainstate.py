"""The digits classifier with Flax Linen and ``TrainState``: LAMB with gradient accumulation.

    python examples/flax_linen_trainstate.py            # ~20 s on 2 CPU cores
    python examples/flax_linen_trainstate.py --tiny

A gradtx optimizer is what ``TrainState.create(tx=...)`` expects: nothing to adapt. Here it is LAMB
(weight decay on kernels only, chosen by path on the Linen params dict) wrapped in
``gradtx.accumulate_gradients``: every ``--accumulate`` micro-batches of ``--micro-batch`` digits
make one LAMB step on their mean gradient: the step LAMB takes on the large batch, up to float
rounding (the mean is summed in a different order; checked at start-up). On the micro-steps in
between, LAMB is not even run (``lax.cond``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (selects the Agg backend; makes a checkout's gradtx importable)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import gradtx  # noqa: E402


class MLP(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.LayerNorm()(nn.Dense(self.hidden)(x)))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def lamb(learning_rate):
    # Linen paths: Dense_0/kernel, Dense_0/bias, LayerNorm_0/scale, ... Decay the kernels only.
    return gradtx.lamb(learning_rate, weight_decay=1e-2, mask=gradtx.masks.paths("*/kernel"))


def loss_fn(params, apply_fn, x, y):
    return _common.cross_entropy(apply_fn({"params": params}, x), y)


@jax.jit(donate_argnums=0)   # the old state's buffers hold the new one: use only the returned state
def train_step(state: TrainState, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state: TrainState, x, y):
    return jnp.mean((jnp.argmax(state.apply_fn({"params": state.params}, x), -1) == y)
                    .astype(jnp.float32))


def check_accumulation(model, params, x, y, k: int) -> float:
    """k accumulated micro-steps vs one LAMB step on the whole batch: the largest difference."""
    # train_step donates its state, and a TrainState holds `params` itself: give each run a copy.
    fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731
    small = TrainState.create(apply_fn=model.apply, params=fresh(),
                              tx=gradtx.accumulate_gradients(lamb(1e-2), every_k=k))
    for xb, yb in zip(np.split(x, k), np.split(y, k)):
        small, _ = train_step(small, xb, yb)
    large, _ = train_step(TrainState.create(apply_fn=model.apply, params=fresh(), tx=lamb(1e-2)),
                          x, y)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                         small.params, large.params))
    return max(float(d) for d in diffs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "flax_linen_trainstate"))
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default 300; 10 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (10 if args.tiny else 300)
    k = args.accumulate
    out = _common.ensure_dir(args.out)

    x_train, y_train, x_test, y_test = _common.load_digits_split()
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.float32))["params"]

    diff = check_accumulation(model, params, x_train[:k * args.micro_batch],
                              y_train[:k * args.micro_batch], k)
    print(f"{k} accumulated micro-steps vs one large-batch LAMB step: max |difference| = "
          f"{diff:.1e}")

    tx = gradtx.accumulate_gradients(lamb(args.lr), every_k=k)
    print("optimizer:")
    print(_common.pretty_repr(tx, width=96, indent="    "))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    micro_steps = steps * k
    batch_idx = _common.batches(len(x_train), args.micro_batch, micro_steps)
    history = {"step": [], "loss": [], "acc": []}
    eval_every = max(1, steps // 30)   # in LAMB steps
    window = []
    with tqdm(total=micro_steps, unit="micro-step", dynamic_ncols=True) as bar:
        for i, idx in enumerate(batch_idx, start=1):
            state, loss = train_step(state, x_train[idx], y_train[idx])
            window.append(float(loss))
            if i % k == 0:
                # state.step counts micro-steps; the inner LAMB state counts applied steps.
                assert bool(state.opt_state.applied)
            if i % (eval_every * k) == 0 or i == micro_steps:
                acc = float(accuracy(state, x_test, y_test))
                history["step"].append(i // k)
                history["loss"].append(float(np.mean(window)))
                history["acc"].append(acc)
                window = []
                bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", acc=f"{acc:.3f}")
            bar.update(1)

    print(f"after {steps} LAMB steps ({micro_steps} micro-batches of {args.micro_batch}): "
          f"train loss {history['loss'][-1]:.4f}, test accuracy {100 * history['acc'][-1]:.1f}%")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogy(history["step"], history["loss"], color="#1f77b4")
    ax1.set(xlabel="LAMB step", ylabel="mean micro-batch loss (log)", title="Training loss")
    ax2.plot(history["step"], 100 * np.asarray(history["acc"]), color="#2ca02c")
    ax2.set(xlabel="LAMB step", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Flax Linen TrainState + gradtx LAMB, {k} x {args.micro_batch} accumulated")
    png = _common.save_figure(fig, os.path.join(out, "training.png"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
