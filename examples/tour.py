"""A five-minute tour of gradtx: optimizers are chains of primitives; train one Flax model six ways.

    python examples/tour.py              # ~1-2 minutes on 2 CPU cores; pictures in out/tour/
    python examples/tour.py --tiny       # a few seconds' worth of steps (used by the tests)
    python examples/tour.py --out DIR

What it does:
1. prints how AdamW, LAMB and Lion are built: each is a plain ``gradtx.chain`` of public primitives,
   and its ``repr`` is that chain;
2. composes a new optimizer from the same primitives (global-norm clipping, AdaBelief's scaling,
   decoupled weight decay that skips biases and norm scales, a warm-up + cosine learning rate);
3. trains the SAME Flax NNX MLP (same initial weights, same batches) on scikit-learn's 8x8 digits
   (shipped with scikit-learn, nothing is downloaded) with SGD+Nesterov, Adam, AdamW, LAMB, Lion
   and the custom optimizer, using ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.jit``;
4. prints a table (final train loss, test accuracy, steps to reach a target train loss, optimizer
   state size, median step time) and writes ``convergence.png`` and ``trajectories.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (selects the Agg backend; makes a checkout's gradtx importable)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import gradtx  # noqa: E402
import trajectories  # noqa: E402

TARGET_LOSS = 0.05  # "steps to target": first evaluation at which the full train loss is below


# ---------------------------------------------------------------------------------------------
# 1-2. Optimizers are values built from primitives

def custom_optimizer(total_steps: int) -> gradtx.Transform:
    """Our own optimizer, composed from gradtx primitives in five lines.

    Clip the gradient's global norm, scale it like AdaBelief (Adam with the variance of the
    gradient around its moving mean), add decoupled weight decay to weight matrices only (biases
    and LayerNorm scales are left alone), then descend with a warm-up + cosine learning rate.
    """
    warmup = max(1, total_steps // 10)
    return gradtx.chain(
        gradtx.clip_by_global_norm(1.0),
        gradtx.scale_by_belief(),
        gradtx.add_decoupled_weight_decay(1e-2, mask=gradtx.masks.decay_default()),
        gradtx.scale_by_learning_rate(gradtx.schedules.warmup_cosine(
            peak_value=3e-3, warmup_steps=warmup, decay_steps_after_warmup=total_steps - warmup)),
    )


def optimizers(total_steps: int) -> dict[str, gradtx.Transform]:
    """The optimizers the tour compares; each is an ordinary (hashable, printable) gradtx value."""
    no_decay_on_biases_and_norms = gradtx.masks.decay_default()
    return {
        "SGD+Nesterov": gradtx.sgd(0.05, momentum=0.9, nesterov=True),
        "Adam": gradtx.adam(1e-3),
        "AdamW": gradtx.adamw(1e-3, weight_decay=1e-2, mask=no_decay_on_biases_and_norms),
        "LAMB": gradtx.lamb(2e-3, weight_decay=1e-2, mask=no_decay_on_biases_and_norms),
        "Lion": gradtx.lion(3e-4, weight_decay=1e-1, mask=no_decay_on_biases_and_norms),
        "Custom": custom_optimizer(total_steps),
    }


def show_chains(txs: dict[str, gradtx.Transform]) -> None:
    print("=" * 100)
    print("Every gradtx optimizer is a chain of primitives; its repr is that chain.\n")
    for name in ("AdamW", "LAMB", "Lion"):
        print(f"{name}:  gradtx.{name.lower()}(...) ==")
        print(_common.pretty_repr(txs[name], width=96, indent="    "))
        print()
    print("A custom optimizer composed here: clipping + AdaBelief scaling + decoupled weight decay")
    print("on weight matrices only + warm-up/cosine learning rate:")
    print(_common.pretty_repr(txs["Custom"], width=96, indent="    "))
    print("=" * 100)


# ---------------------------------------------------------------------------------------------
# 3. Training with Flax NNX

@nnx.jit(donate_argnums=(0, 1))
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return _common.cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # tx.update(grads, state, params) + apply_updates
    return loss


@nnx.jit
def evaluate(model, x_train, y_train, x_test, y_test):
    train_loss = _common.cross_entropy(model(x_train), y_train)
    accuracy = jnp.mean((jnp.argmax(model(x_test), axis=-1) == y_test).astype(jnp.float32))
    return train_loss, accuracy


def train(name, tx, data, batch_idx, eval_every, seed, bar):
    x_train, y_train, x_test, y_test = data
    model = _common.MLP(rngs=nnx.Rngs(seed))                 # same seed: same initial weights
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    state_bytes = _common.tree_bytes(jax.eval_shape(tx.init, params))
    history = {"step": [], "train_loss": [], "test_acc": []}
    times = []

    def record(step):
        loss, acc = evaluate(model, x_train, y_train, x_test, y_test)
        history["step"].append(step)
        history["train_loss"].append(float(loss))
        history["test_acc"].append(float(acc))

    record(0)
    bar.set_description(f"{name:<12}")
    for step, idx in enumerate(batch_idx, start=1):
        x, y = x_train[idx], y_train[idx]
        t0 = time.perf_counter()
        loss = float(train_step(model, optimizer, x, y))   # float() waits for the result
        times.append(time.perf_counter() - t0)
        if step % eval_every == 0 or step == len(batch_idx):
            record(step)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

    losses = np.asarray(history["train_loss"])
    reached = np.nonzero(losses < TARGET_LOSS)[0]
    return {
        "history": history,
        "final_loss": losses[-1],
        "test_acc": history["test_acc"][-1],
        "steps_to_target": int(history["step"][reached[0]]) if len(reached) else None,
        "state_bytes": state_bytes,
        "median_step_ms": 1e3 * float(np.median(times[2:] if len(times) > 4 else times)),
    }


# ---------------------------------------------------------------------------------------------
# 4. Reporting

def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def print_table(results: dict, n_params: int, steps: int) -> None:
    header = (f"{'optimizer':<14}{'final train loss':>17}{'test accuracy':>15}"
              f"{'steps to loss<' + format(TARGET_LOSS, 'g'):>20}{'state bytes':>14}"
              f"{'median step':>14}")
    print()
    print(f"Results after {steps} steps (MLP with {n_params:,} parameters = "
          f"{_bytes(4 * n_params)} in float32):")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        reached = str(r["steps_to_target"]) if r["steps_to_target"] is not None else "not reached"
        print(f"{name:<14}{r['final_loss']:>17.3g}{100 * r['test_acc']:>14.1f}%{reached:>20}"
              f"{_bytes(r['state_bytes']):>14}{r['median_step_ms']:>11.2f} ms")
    print()


def plot_convergence(results: dict, path: str, steps: int, n_test: int) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("tab10").colors
    for color, (name, r) in zip(colors, results.items()):
        h = r["history"]
        # AdamW is dashed: with a small decay it runs on top of Adam's curve.
        style = dict(color=color, lw=1.8, label=name, ls="--" if name == "AdamW" else "-")
        ax_loss.plot(h["step"], h["train_loss"], **style)
        ax_acc.plot(h["step"], 100 * np.asarray(h["test_acc"]), **style)
    ax_loss.axhline(TARGET_LOSS, color="k", ls=":", lw=1, label=f"target {TARGET_LOSS:g}")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy, whole training set (log scale)")
    ax_loss.set_title("Training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title(f"Test accuracy ({n_test} held-out digits)")
    finals = [100 * r["test_acc"] for r in results.values()]
    ax_acc.set_ylim(max(0.0, min(finals) - 12.0), 100.5)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlim(0, steps)
        ax.legend(fontsize=9)
    fig.suptitle("Same Flax NNX MLP, same initial weights and batches: sklearn 8x8 digits",
                 fontsize=13)
    _common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "tour"),
                        help="output folder (default: out/tour)")
    parser.add_argument("--tiny", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per optimizer (default 800; 20 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    steps = args.steps or (20 if args.tiny else 800)
    eval_every = 5 if args.tiny else 10
    out = _common.ensure_dir(args.out)
    started = time.perf_counter()

    txs = optimizers(steps)
    show_chains(txs)

    x_train, y_train, x_test, y_test = _common.load_digits_split(seed=args.seed)
    data = (jnp.asarray(x_train), jnp.asarray(y_train), jnp.asarray(x_test), jnp.asarray(y_test))
    batch_idx = _common.batches(len(x_train), args.batch_size, steps, seed=args.seed)
    n_params = sum(int(np.prod(p.shape)) for p in
                   jax.tree.leaves(nnx.state(_common.MLP(rngs=nnx.Rngs(0)), nnx.Param)))
    print(f"\nTraining on {len(x_train)} digits (testing on {len(x_test)}), batch size "
          f"{args.batch_size}, {steps} steps per optimizer, {len(txs)} optimizers:")

    results = {}
    with tqdm(total=steps * len(txs), unit="step", dynamic_ncols=True) as bar:
        for name, tx in txs.items():
            results[name] = train(name, tx, data, batch_idx, eval_every, args.seed, bar)

    print_table(results, n_params, steps)

    convergence_png = os.path.join(out, "convergence.png")
    plot_convergence(results, convergence_png, steps, len(x_test))
    trajectories_png = os.path.join(out, "trajectories.png")
    print("Optimizer paths on 2-D test functions (examples/trajectories.py):")
    if args.tiny:  # two functions, few steps, coarse contours
        trajectories.plot_trajectories(trajectories_png, names=("rosenbrock", "saddle"),
                                       steps_scale=0.1, resolution=60)
    else:
        trajectories.plot_trajectories(trajectories_png)
    print(f"\nWrote {convergence_png}\n      {trajectories_png}")
    print(f"Output folder: {out}   (total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
