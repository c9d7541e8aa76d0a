"""A small character-level Transformer LM (Flax NNX): AdamW vs Lion with per-group learning rates.

    python examples/transformer_lm.py     # 1-2 minutes on 2 free CPU cores; out/transformer_lm/
    python examples/transformer_lm.py --tiny

The text is offline by construction: Python standard-library sources read from this interpreter's
own files. The embeddings (token and position) form one parameter group with their own learning
rate and no weight decay; everything else is the other group, with decay on weight matrices only.
``gradtx.partition`` applies a different optimizer to each group, ``gradtx.masks.labels`` assigns
the groups by path, and the current learning rate of each group is read back from the optimizer
state with ``gradtx.current_hyperparams`` for logging (no wrapper needed).
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

STDLIB_FILES = ("textwrap.py", "heapq.py", "bisect.py", "string.py", "shlex.py", "fnmatch.py",
                "colorsys.py", "keyword.py", "queue.py", "sched.py")


def load_text() -> str:
    root = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    text = "\n".join(parts)
    return "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text)


# ---------------------------------------------------------------------------------------------
# Model

class CausalSelfAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))                           # (b, t, h, d/h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads).astype(np.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.proj(out.reshape(b, t, d))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = CausalSelfAttention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class CharLM(nnx.Module):
    def __init__(self, vocab: int, context: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.embed_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.embed_pos[None, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ---------------------------------------------------------------------------------------------
# Optimizers: one per parameter group

GROUPS = gradtx.masks.labels({"embeddings": ("embed/*", "embed_pos")}, default="rest")


def grouped(make, peak_lr: float, embed_lr_scale: float, weight_decay: float, steps: int):
    warmup = max(1, steps // 10)

    def schedule(peak):
        peak = float(f"{peak:.6g}")           # 0.0009, not 0.0009000000000000001, in the repr
        return gradtx.schedules.warmup_cosine(peak_value=peak, warmup_steps=warmup,
                                              decay_steps_after_warmup=steps - warmup,
                                              end_value=float(f"{peak / 10:.6g}"))

    return gradtx.partition({
        "embeddings": make(schedule(peak_lr * embed_lr_scale), weight_decay=0.0),
        "rest": make(schedule(peak_lr), weight_decay=weight_decay,
                     mask=gradtx.masks.decay_default()),
    }, labels=GROUPS)


def optimizers(steps: int) -> dict[str, gradtx.Transform]:
    return {
        "AdamW": grouped(gradtx.adamw, 3e-3, 0.3, 0.1, steps),
        # Lion: the paper's advice, a 3-10x smaller learning rate and a 3-10x larger decay.
        "Lion": grouped(gradtx.lion, 1e-3, 0.3, 0.3, steps),
    }


def learning_rates(tx, opt_state) -> dict[str, float]:
    """The learning rate each group used in the latest update, read from the optimizer state."""
    values = gradtx.current_hyperparams(tx, nnx.as_pure(opt_state))
    out = {}
    for key, value in values.items():
        if key.endswith("learning_rate"):
            group = "embeddings" if "embeddings" in key else "rest"
            out[group] = float(value)
    return out


@nnx.jit(donate_argnums=(0, 1))   # the parameter and state buffers are reused in place
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lm_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, tokens):
    return lm_loss(model, tokens)


@nnx.jit
def _logits_at(model, window, pos):
    return model(window)[0, pos]


def sample(model, prompt_ids, n: int, context: int, key, temperature: float = 0.8):
    """Sample ``n`` characters after ``prompt_ids`` (one compiled forward pass per character)."""
    ids = list(prompt_ids)
    for _ in range(n):
        recent = ids[-context:]
        window = jnp.asarray([recent + [0] * (context - len(recent))], jnp.int32)
        logits = _logits_at(model, window, jnp.int32(len(recent) - 1))
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, logits / temperature)))
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "transformer_lm"))
    parser.add_argument("--steps", type=int, default=None, help="default 400 (8 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.tiny else 400)
    eval_every = 2 if args.tiny else 25
    out = _common.ensure_dir(args.out)

    text = load_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.asarray([stoi[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"{len(text):,} characters of Python standard-library source, vocabulary {len(chars)}")

    rng = np.random.default_rng(0)
    n = args.context + 1
    starts = rng.integers(0, len(train_data) - n, size=(steps, args.batch_size))
    batches = train_data[starts[..., None] + np.arange(n)]                      # (steps, B, n)
    val_starts = np.random.default_rng(1).integers(0, len(val_data) - n, size=128)
    val_batch = jnp.asarray(val_data[val_starts[:, None] + np.arange(n)])

    results = {}
    for name, tx in optimizers(steps).items():
        print(f"\n{name}:")
        print(_common.pretty_repr(tx, width=96, indent="    "))
        model = CharLM(len(chars), args.context, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        log = {"step": [], "train": [], "val": [], "lr_embeddings": [], "lr_rest": []}
        t0 = time.perf_counter()
        with tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True) as bar:
            for step in range(1, steps + 1):
                loss = float(train_step(model, optimizer, jnp.asarray(batches[step - 1])))
                if step % eval_every == 0 or step == steps:
                    lrs = learning_rates(tx, optimizer.opt_state)
                    log["step"].append(step)
                    log["train"].append(loss)
                    log["val"].append(float(eval_loss(model, val_batch)))
                    log["lr_embeddings"].append(lrs["embeddings"])
                    log["lr_rest"].append(lrs["rest"])
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lrs['rest']:.2e}",
                                    lr_embed=f"{lrs['embeddings']:.2e}")
                bar.update(1)
        elapsed = time.perf_counter() - t0
        prompt = [stoi[c] for c in "def "]
        ids = sample(model, prompt, 0 if args.tiny else 120, args.context, jax.random.key(0))
        results[name] = dict(log=log, seconds=elapsed, sample="".join(chars[i] for i in ids))
        lrs = learning_rates(tx, optimizer.opt_state)
        print(f"current learning rates (read from the optimizer state): "
              f"embeddings {lrs['embeddings']:.3g}, rest {lrs['rest']:.3g}")

    print(f"\n{'optimizer':<10}{'train loss':>12}{'val loss':>10}{'val bits/char':>15}{'time':>9}")
    for name, r in results.items():
        val = r["log"]["val"][-1]
        print(f"{name:<10}{r['log']['train'][-1]:>12.3f}{val:>10.3f}{val / np.log(2):>15.3f}"
              f"{r['seconds']:>8.1f}s")
    for name, r in results.items():
        if len(r["sample"]) > 4:
            print(f"\n--- {name} sample ---\n{r['sample']}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for color, (name, r) in zip(("#1f77b4", "#d62728"), results.items()):
        log = r["log"]
        ax1.plot(log["step"], log["train"], color=color, alpha=0.5, label=f"{name} train")
        ax1.plot(log["step"], log["val"], color=color, lw=2, label=f"{name} validation")
        ax2.plot(log["step"], log["lr_rest"], color=color, lw=2, label=f"{name}: rest")
        ax2.plot(log["step"], log["lr_embeddings"], color=color, ls="--",
                 label=f"{name}: embeddings")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="Loss")
    ax2.set(xlabel="step", ylabel="learning rate", title="Learning rate per group (from state)",
            yscale="log")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Character-level Transformer LM on Python stdlib sources: AdamW vs Lion")
    png = _common.save_figure(fig, os.path.join(out, "lm.png"))
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
