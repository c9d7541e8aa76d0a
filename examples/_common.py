"""Shared helpers for the gradtx examples: the digits dataset, a small Flax NNX MLP, plotting setup.

Nothing here is downloaded: the 8x8 digits ship with scikit-learn.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import matplotlib

# Run from a checkout without installing: make the repository's gradtx importable.
if importlib.util.find_spec("gradtx") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

matplotlib.use("Agg")  # files only; no display needed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Data

def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """The 1,797 8x8 digit images of scikit-learn, as float32 in [0, 1], split train/test.

    Returns ``(x_train, y_train, x_test, y_test)`` as NumPy arrays (images flattened to 64 values,
    labels int32). The split is stratified-free but fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def batches(n: int, batch_size: int, steps: int, seed: int = 0):
    """Index arrays of ``steps`` mini-batches: shuffled epochs, the same order for every run."""
    rng = np.random.default_rng(seed)
    out, pool = [], np.empty(0, dtype=np.int64)
    while len(out) < steps:
        if len(pool) < batch_size:
            pool = np.concatenate([pool, rng.permutation(n)])
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Model

class MLP(nnx.Module):
    """A small classifier: Linear -> LayerNorm -> GELU -> Linear -> GELU -> Linear.

    It has the three kinds of parameters a weight-decay mask cares about: weight matrices
    (decayed), biases and the LayerNorm scale/bias (not decayed).
    """

    def __init__(self, n_in: int = 64, hidden: int = 128, n_out: int = 10, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(n_in, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, n_out, rngs=rngs)

    def __call__(self, x):
        x = nnx.gelu(self.norm(self.fc1(x)))
        x = nnx.gelu(self.fc2(x))
        return self.head(x)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of a tree (works on abstract ``ShapeDtypeStruct`` leaves)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


# ---------------------------------------------------------------------------------------------
# Printing

def pretty_repr(obj, width: int = 96, indent: str = "  ") -> str:
    """Lay out a nested call-like ``repr`` (``chain(a(x=1), b())``) over several lines.

    A call that fits in ``width`` stays on one line; a longer one puts each argument on its own
    line, indented. Strings and brackets are respected.
    """
    text = repr(obj) if not isinstance(obj, str) else obj

    def split_args(s):
        parts, depth, start, quote = [], 0, 0, None
        for i, ch in enumerate(s):
            if quote:
                if ch == quote and s[i - 1] != "\\":
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:i].strip())
                start = i + 1
        tail = s[start:].strip()
        if tail:
            parts.append(tail)
        return parts

    def fmt(s, level):
        pad = indent * level
        if len(pad) + len(s) <= width:
            return pad + s
        m = re.match(r"^((?:\w+=|'[^']*':\s*)?[\w.]*)([(\[{])(.*)([)\]}])$", s, re.S)
        if not m:
            return pad + s
        head, open_, body, close = m.groups()
        inner = [fmt(a, level + 1) + "," for a in split_args(body)]
        return "\n".join([pad + head + open_, *inner, pad + close])

    return fmt(text, 0)


def check_png(path) -> None:
    """Raise if ``path`` is not a readable, non-blank PNG image."""
    import matplotlib.image as mpimg

    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ValueError(f"{path} is not a PNG file")
    img = mpimg.imread(path)
    if img.ndim != 3 or img.shape[0] < 100 or img.shape[1] < 100 or float(np.std(img)) == 0.0:
        raise ValueError(f"{path} is an empty or degenerate image: shape {img.shape}")


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Lay ``fig`` out, write it to ``path`` and close it (so long runs do not keep figures)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)
