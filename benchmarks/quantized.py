"""8-bit quantized optimizer state: accuracy on the examples' models, state bytes, step time.

    python -m benchmarks.quantized            # the full study (about 10 minutes on 2 CPU cores)
    python -m benchmarks.quantized --quick    # AdamW and Lion, few steps, 1M parameters: ~1 min
    python -m benchmarks.quantized --write benchmarks/RESULTS-quantized.md

For each of Adam, AdamW, Lion, LAMB and SGD with momentum, the same optimizer (same
hyperparameters, same initial parameters, same batches) is run with float32 state and wrapped in
:func:`gradtx.quantized_state` with ``rounding="nearest"`` and ``rounding="stochastic"``, each with
the default dynamic map and with ``code_map="float8"`` ("8-bit float8 ..." rows):

* **digits**: the MLP classifier of ``examples/_common.py`` (64 -> 128 -> 128 -> 10 with LayerNorm;
  its two big matrices are quantized, the 1,280-element head and the vectors are not) on the
  scikit-learn digits, batch 64, 200 steps (9 epochs: longer runs memorise the 1,437 training
  images and the training loss falls to ~1e-3, where ratios measure noise);
* **char LM**: the small Transformer of ``examples/transformer_lm.py`` (2 blocks, d=64, 117k
  parameters, 11 of its 30 leaves quantized) on its Python-source text, batch 32, context 64, a
  warmup-cosine schedule. Fewer steps than the example's 400 (see the table) to keep the run
  short; plain optimizers over the whole tree instead of the example's two parameter groups.

The final loss is the mean training loss over the last 5% of the steps (the same minibatches for
every run), plus the held-out loss after the last step. The whole run is one ``lax.scan`` per
(task, optimizer, state) compiled once.

**Step time** is measured on a 16.8M-parameter tree (one 4096x4096 float32 matrix, like the
``leaf16M`` tree of the main harness): ``params, state = step(params, state, grads)`` with
``update`` + ``apply_updates`` jitted, params and state donated, all variants of an optimizer timed
in interleaved rounds in this process (median of the rounds); XLA's memory analysis gives the
step's temporary buffers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradtx
from benchmarks import report
from benchmarks.timing import OptimizerStep, measure
from benchmarks.trees import tree_nbytes

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

VARIANTS = ("float32", "8-bit nearest", "8-bit stochastic", "8-bit float8 nearest",
            "8-bit float8 stochastic")
OPTIMIZERS = ("adam", "adamw", "lion", "lamb", "sgd_momentum")


def wrap(tx, variant: str):
    if variant == "float32":
        return tx
    code_map = "float8" if "float8" in variant else "dynamic"
    return gradtx.quantized_state(tx, rounding=variant.split()[-1], code_map=code_map)


# ---------------------------------------------------------------------------------------------
# Training tasks

def digits_task(steps: int):
    from flax import nnx

    import _common

    x_train, y_train, x_test, y_test = _common.load_digits_split()
    idx = _common.batches(len(x_train), 64, steps, seed=0)
    xb, yb = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
    graphdef, params, rest = nnx.split(_common.MLP(rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, x, y):
        return _common.cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    def make(name: str, schedule_steps: int):
        del schedule_steps
        return {"adam": gradtx.adam(1e-3),
                "adamw": gradtx.adamw(1e-3, weight_decay=1e-2),
                "lion": gradtx.lion(3e-4, weight_decay=1e-1),
                "lamb": gradtx.lamb(1e-3, weight_decay=1e-2),
                "sgd_momentum": gradtx.sgd(0.02, momentum=0.9)}[name]

    held_out = (jnp.asarray(x_test), jnp.asarray(y_test))
    return dict(name="digits", params=params, loss=loss, batches=(xb, yb), held_out=held_out,
                make=make, steps=steps)


def lm_task(steps: int, batch_size: int = 32, context: int = 64):
    from flax import nnx

    import transformer_lm

    text = transformer_lm.load_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.asarray([stoi[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    n = context + 1
    starts = np.random.default_rng(0).integers(0, len(train) - n, size=(steps, batch_size))
    tokens = jnp.asarray(train[starts[..., None] + np.arange(n)])
    val_starts = np.random.default_rng(1).integers(0, len(val) - n, size=128)
    val_tokens = jnp.asarray(val[val_starts[:, None] + np.arange(n)])
    model = transformer_lm.CharLM(len(chars), context, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, tok):
        return transformer_lm.lm_loss(nnx.merge(graphdef, p, rest), tok)

    def make(name: str, schedule_steps: int):
        warmup = max(1, schedule_steps // 10)

        def sched(peak):
            return gradtx.schedules.warmup_cosine(
                peak_value=peak, warmup_steps=warmup,
                decay_steps_after_warmup=schedule_steps - warmup, end_value=peak / 10)

        return {"adam": gradtx.adam(sched(3e-3)),
                "adamw": gradtx.adamw(sched(3e-3), weight_decay=0.1),
                "lion": gradtx.lion(sched(1e-3), weight_decay=0.3),
                "lamb": gradtx.lamb(sched(5e-3), weight_decay=0.1),
                "sgd_momentum": gradtx.sgd(sched(0.3), momentum=0.9)}[name]

    return dict(name="char LM", params=params, loss=loss, batches=(tokens,),
                held_out=(val_tokens,), make=make, steps=steps)


def train(task, tx):
    """Train with ``tx`` over the task's batches; returns (losses per step, held-out loss, s)."""
    loss_fn = task["loss"]

    @jax.jit
    def run(params, batches):
        def step(carry, batch):
            p, s = carry
            value, grads = jax.value_and_grad(loss_fn)(p, *batch)
            u, s = tx.update(grads, s, p)
            return (gradtx.apply_updates(p, u), s), value
        (p, s), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
        return losses, loss_fn(p, *task["held_out"])

    compiled = run.lower(task["params"], task["batches"]).compile()
    t0 = time.perf_counter()
    losses, held = jax.block_until_ready(compiled(task["params"], task["batches"]))
    return np.asarray(losses), float(held), time.perf_counter() - t0


def state_bytes(tx, params) -> int:
    """Bytes of ``tx``'s state for ``params`` (abstract: nothing is allocated)."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(jax.eval_shape(tx.init, params))))


def accuracy_rows(task, optimizers, log):
    rows = []
    tail = max(1, int(round(0.05 * task["steps"])))
    for name in optimizers:
        base = None
        for variant in VARIANTS:
            tx = wrap(task["make"](name, task["steps"]), variant)
            losses, held, seconds = train(task, tx)
            final = float(np.mean(losses[-tail:]))
            row = dict(task=task["name"], optimizer=name, variant=variant, final=final,
                       held=held, seconds=seconds, bytes=state_bytes(tx, task["params"]),
                       finite=bool(np.all(np.isfinite(losses))))
            if base is None:
                base = row
            row["loss_ratio"] = final / base["final"]
            row["held_ratio"] = held / base["held"]
            row["bytes_ratio"] = row["bytes"] / base["bytes"]
            row["time_ratio"] = seconds / base["seconds"]
            rows.append(row)
            log(f"  {task['name']:8s} {name:13s} {variant:24s} final {final:.4f} "
                f"(x{row['loss_ratio']:.3f})  held-out {held:.4f}  {seconds:.1f}s")
    return rows


# ---------------------------------------------------------------------------------------------
# Step time

def speed_rows(side: int, reps: int, optimizers, log):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((side, side), np.float32) * 0.02)}
    grads = {"w": jnp.asarray(rng.standard_normal((side, side), np.float32) * 0.01)}
    makers = {"adam": lambda: gradtx.adam(1e-3),
              "adamw": lambda: gradtx.adamw(1e-3, weight_decay=1e-4),
              "lion": lambda: gradtx.lion(1e-4, weight_decay=1e-3),
              "lamb": lambda: gradtx.lamb(1e-3),
              "sgd_momentum": lambda: gradtx.sgd(1e-3, momentum=0.9)}
    rows = []
    for name in optimizers:
        cands = [OptimizerStep(variant, "gradtx", wrap(makers[name](), variant),
                               gradtx.apply_updates, params, grads) for variant in VARIANTS]
        timings = measure(cands, warmup=2, reps=reps)
        base = timings["float32"].median_s
        for c in cands:
            t = timings[c.label]
            info = c.compile_info
            rows.append(dict(optimizer=name, variant=c.label, ms=t.median_s * 1e3, n=t.n,
                             ratio=t.median_s / base, state_bytes=c.state_bytes,
                             temp_bytes=info.temp_bytes, copies=info.hlo_copies))
            log(f"  step {name:13s} {c.label:24s} {t.median_s * 1e3:8.1f} ms "
                f"(x{t.median_s / base:.2f}, {t.n} rounds)  temp {info.temp_bytes / 2**20:.0f} MiB")
        for c in cands:
            c.release()
    return rows


# ---------------------------------------------------------------------------------------------
# Report

def markdown(acc_rows, speed, n_params, command, elapsed, load_before, load_after, steps) -> str:
    info = report.machine_info()
    out = ["# 8-bit quantized optimizer state: accuracy, memory, step time", "",
           f"Generated by `benchmarks/quantized.py` on {datetime.date.today().isoformat()}.", "",
           report.machine_lines(info, command, load_before, load_after, elapsed), "",
           "## Accuracy on the examples' models", "",
           "Same optimizer, hyperparameters, initial parameters and minibatches; only the state "
           "precision differs. *final* = mean training loss over the last 5% of the steps; "
           "*held-out* = loss on held-out data after the last step (digits: the 20% test split; "
           "char LM: 128 validation windows). Ratios are against the float32 row. "
           f"Steps: digits {steps['digits']}, char LM {steps['char LM']} (the example runs 400).",
           "",
           "| task | optimizer | state | final loss | ratio | held-out loss | ratio | "
           "state bytes | ratio | train time ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in acc_rows:
        out.append(f"| {r['task']} | {r['optimizer']} | {r['variant']} | {r['final']:.4f} | "
                   f"{r['loss_ratio']:.3f} | {r['held']:.4f} | {r['held_ratio']:.3f} | "
                   f"{r['bytes']:,} | {r['bytes_ratio']:.3f} | {r['time_ratio']:.2f} |")
    out += ["", "State bytes of these small models include the leaves under 4,096 elements that "
            "stay float32 (biases, norms, the digits head) and the optimizers' counters.", "",
            f"## Step time on a {n_params / 1e6:.1f}M-parameter tree", "",
            "One square float32 matrix; `update` + `apply_updates` jitted with params and state "
            "donated; the variants of each optimizer timed in interleaved rounds (median). "
            "*temp* = XLA's temporary buffers for the step "
            "(`memory_analysis().temp_size_in_bytes`).",
            "", "| optimizer | state | step ms | ratio | rounds | state MiB | state ratio | "
            "temp MiB |", "|---|---|---|---|---|---|---|---|"]
    base_bytes = {}
    for r in speed:
        if r["variant"] == "float32":
            base_bytes[r["optimizer"]] = r["state_bytes"]
        out.append(f"| {r['optimizer']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
                   f"{r['n']} | {r['state_bytes'] / 2**20:.1f} | "
                   f"{r['state_bytes'] / base_bytes[r['optimizer']]:.3f} | "
                   f"{(r['temp_bytes'] or 0) / 2**20:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="AdamW and Lion only, few steps, a 1M-parameter tree")
    parser.add_argument("--write", metavar="FILE", default=None,
                        help="write the Markdown report to FILE (default: print it only)")
    parser.add_argument("--digits-steps", type=int, default=None, help="default 200 (quick 100)")
    parser.add_argument("--lm-steps", type=int, default=None, help="default 250 (quick 20)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds, default 15 (quick 5)")
    args = parser.parse_args(argv)
    digits_steps = args.digits_steps or (100 if args.quick else 200)
    lm_steps = args.lm_steps or (20 if args.quick else 250)
    reps = args.reps or (5 if args.quick else 15)
    side = 1024 if args.quick else 4096
    optimizers = ("adamw", "lion") if args.quick else OPTIMIZERS

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python -m benchmarks.quantized" + (" " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])).rstrip()
    load_before = report.load_average()
    t0 = time.perf_counter()
    log(f"step time on a {side}x{side} tree ({reps} rounds)")
    speed = speed_rows(side, reps, optimizers, log)
    rows = []
    for task in (digits_task(digits_steps), lm_task(lm_steps)):
        log(f"training: {task['name']} ({task['steps']} steps)")
        rows += accuracy_rows(task, optimizers, log)
    elapsed = time.perf_counter() - t0
    text = markdown(rows, speed, side * side, command, elapsed, load_before,
                    report.load_average(), {"digits": digits_steps, "char LM": lm_steps})
    report.publish(text, args.write, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
