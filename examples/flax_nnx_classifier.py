"""A complete Flax NNX training program with gradtx: the digits classifier, done properly.

    python examples/flax_nnx_classifier.py                    # 600 steps, out/flax_nnx_classifier/
    python examples/flax_nnx_classifier.py --stop-after 300   # simulate an interruption ...
    python examples/flax_nnx_classifier.py --resume           # ... and continue, bit-identically

What it shows:
- ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with a gradtx optimizer, stepped inside ``nnx.jit``
  with the model and the optimizer donated (their buffers are reused for the new values);
- the optimizer: global-norm clipping, then AdamW with a warm-up + cosine learning rate and weight
  decay only on weight matrices (no decay on biases and LayerNorm scales, selected *by path*), then
  an exponential moving average of the parameters kept in the optimizer state;
- evaluation with the averaged (EMA) parameters next to the raw ones;
- an Orbax checkpoint of the model and optimizer state every ``--ckpt-every`` steps, and
  ``--resume``, which continues from the latest checkpoint and ends with exactly the same
  parameters as an uninterrupted run (the data order is a pure function of the step);
- a progress bar, and a plot of the loss and the accuracies (``training.png``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (selects the Agg backend; makes a checkout's gradtx importable)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import gradtx  # noqa: E402


def make_optimizer(total_steps: int, peak_lr: float = 3e-3) -> gradtx.Transform:
    warmup = max(1, total_steps // 10)
    learning_rate = gradtx.schedules.warmup_cosine(
        peak_value=peak_lr, warmup_steps=warmup, decay_steps_after_warmup=total_steps - warmup)
    # Parameter paths in this model: fc1/kernel, fc1/bias, norm/scale, norm/bias, fc2/..., head/...
    # Decay the weight matrices only. `paths` raises if a pattern matches nothing (a typo must not
    # silently turn weight decay off); gradtx.masks.decay_default() is the ready-made equivalent.
    decay_mask = ~gradtx.masks.paths("*/bias", "norm/scale")
    return gradtx.chain(
        gradtx.clip_by_global_norm(1.0),
        gradtx.adamw(learning_rate, weight_decay=1e-2, mask=decay_mask),
        gradtx.ema_params(decay=0.99, warmup=True),   # last: it averages the updated parameters
    )


def make_model_and_optimizer(total_steps: int, seed: int = 0):
    """The MLP (initial weights fixed by ``seed``) and its ``nnx.Optimizer``."""
    model = _common.MLP(rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, make_optimizer(total_steps), wrt=nnx.Param)


# Donate the model and the optimizer: their old parameter and state buffers are reused for the
# new values instead of fresh buffers being allocated every step. nnx.jit writes the new values
# back into `model` and `optimizer`, so they stay usable; only arrays taken out of them before the
# step (e.g. `nnx.state(model)` leaves) are deleted by it.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return _common.cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model, optimizer, x, y):
    """Accuracy of the raw parameters and of their EMA (kept in the optimizer state)."""
    accuracy = jnp.mean((jnp.argmax(model(x), -1) == y).astype(jnp.float32))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    ema = gradtx.averaged_params(nnx.as_pure(optimizer.opt_state))   # same structure as params
    ema_model = nnx.merge(graphdef, nnx.State(ema), rest)
    ema_accuracy = jnp.mean((jnp.argmax(ema_model(x), -1) == y).astype(jnp.float32))
    return accuracy, ema_accuracy


def digest(tree) -> str:
    """A SHA-256 of every array's bytes, in path order: equal digests = bit-identical arrays."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "flax_nnx_classifier"))
    parser.add_argument("--steps", type=int, default=None, help="total steps (default 600)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ckpt-every", type=int, default=None, help="default 100 (10 with --tiny)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 25 (5 with --tiny)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step (simulates an interruption; resume later)")
    parser.add_argument("--tiny", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    steps = args.steps or (30 if args.tiny else 600)
    ckpt_every = args.ckpt_every or (10 if args.tiny else 100)
    eval_every = args.eval_every or (5 if args.tiny else 25)
    out = _common.ensure_dir(args.out)
    ckpt_dir = os.path.join(out, "checkpoints")

    # Data: the order of the batches depends only on the seed and the step number, so a resumed
    # run sees exactly the batches the uninterrupted run would have seen.
    x_train, y_train, x_test, y_test = _common.load_digits_split(seed=args.seed)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    batch_idx = _common.batches(len(x_train), args.batch_size, steps, seed=args.seed)

    model, optimizer = make_model_and_optimizer(steps, args.seed)
    tx = optimizer.tx
    print("optimizer:")
    print(_common.pretty_repr(tx, width=96, indent="    "))

    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    history = {"step": [], "loss": [], "acc": [], "ema_acc": []}
    start = 0
    if args.resume:
        latest = manager.latest_step()
        if latest is None:
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}; run without --resume first.")
        # Restore into the shapes/dtypes of the freshly built model and optimizer.
        target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        start = latest
        print(f"resumed from the checkpoint of step {latest}")
    elif manager.latest_step() is not None:
        for step in manager.all_steps():      # a fresh run replaces old checkpoints
            manager.delete(step)

    stop = min(steps, args.stop_after) if args.stop_after else steps
    loss = float("nan")
    with tqdm(total=stop - start, unit="step", dynamic_ncols=True) as bar:
        for step in range(start + 1, stop + 1):
            idx = batch_idx[step - 1]
            loss = float(train_step(model, optimizer, x_train[idx], y_train[idx]))
            if step % eval_every == 0 or step == stop:
                acc, ema_acc = evaluate(model, optimizer, x_test, y_test)
                history["step"].append(step)
                history["loss"].append(loss)
                history["acc"].append(float(acc))
                history["ema_acc"].append(float(ema_acc))
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{float(acc):.3f}",
                                ema_acc=f"{float(ema_acc):.3f}")
            if step % ckpt_every == 0 or step == stop:
                manager.save(step, args=ocp.args.StandardSave(
                    {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}))
            bar.update(1)
    manager.wait_until_finished()

    print(f"step {stop}: train loss {loss:.4f}")
    if history["step"]:
        print(f"test accuracy {100 * history['acc'][-1]:.1f}% (raw parameters), "
              f"{100 * history['ema_acc'][-1]:.1f}% (EMA parameters)")
    print(f"checkpoints: {sorted(manager.all_steps())} in {ckpt_dir}")
    print(f"digests after step {stop}: params {digest(nnx.state(model, nnx.Param))}, "
          f"optimizer state {digest(nnx.state(optimizer))}")

    if history["step"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.semilogy(history["step"], history["loss"], color="#1f77b4")
        ax1.set(xlabel="step", ylabel="mini-batch loss (log)", title="Training loss")
        ax2.plot(history["step"], 100 * np.asarray(history["acc"]), label="raw parameters")
        ax2.plot(history["step"], 100 * np.asarray(history["ema_acc"]), label="EMA parameters")
        ax2.set(xlabel="step", ylabel="test accuracy (%)", title="Test accuracy")
        ax2.set_ylim(max(0.0, 100 * min(history["ema_acc"][-1], history["acc"][-1]) - 15), 100.5)
        ax2.legend()
        for ax in (ax1, ax2):
            ax.grid(True, which="both", alpha=0.3)
        title = "resumed run" if args.resume else "run"
        fig.suptitle(f"Flax NNX MLP on sklearn digits: AdamW + warm-up/cosine + EMA ({title}, "
                     f"steps {start + 1}-{stop})")
        png = _common.save_figure(fig, os.path.join(out, "training.png"))
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
