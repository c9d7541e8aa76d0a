"""Parameter trees the harness runs on: one big leaf, transformer-like trees and many small leaves.

Every tree is a nested dict of float32 arrays. Values are drawn from a seeded normal distribution with
NumPy (so the trees are identical across runs and implementations) and placed on the default device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A named recipe for a parameter tree: ``build()`` returns a dict of NumPy shapes."""

    name: str
    description: str
    shapes: Callable[[], dict]

    def shape_tree(self) -> dict:
        return self.shapes()


def single_leaf(n_rows: int, n_cols: int) -> dict:
    """One matrix leaf of ``n_rows * n_cols`` elements (2-D, so Adafactor factors it)."""
    return {"w": (n_rows, n_cols)}


def transformer(layers: int, d: int, vocab: int = 32000, mlp_ratio: int = 4) -> dict:
    """A GPT-like parameter tree: a token embedding and ``layers`` blocks of 16 leaves each.

    Each block has q/k/v/o projections with biases, a two-layer MLP (``d -> mlp_ratio*d -> d``) with
    biases and two layer norms (scale, bias): about ``12 d^2`` parameters per block. With
    ``layers=12, d=512`` this is 54.2M parameters in 193 leaves; ``layers=24, d=384`` is 54.9M in 385.
    """
    tree = {"embed": (vocab, d)}
    for i in range(layers):
        tree[f"block_{i:02d}"] = {
            "attn": {"q_w": (d, d), "q_b": (d,), "k_w": (d, d), "k_b": (d,),
                     "v_w": (d, d), "v_b": (d,), "o_w": (d, d), "o_b": (d,)},
            "mlp": {"up_w": (d, mlp_ratio * d), "up_b": (mlp_ratio * d,),
                    "down_w": (mlp_ratio * d, d), "down_b": (d,)},
            "ln1": {"scale": (d,), "bias": (d,)},
            "ln2": {"scale": (d,), "bias": (d,)},
        }
    return tree


def many_leaves(n: int, shape=(64, 64)) -> dict:
    """``n`` independent leaves of the same small shape (the many-leaf / dispatch-overhead case)."""
    return {f"leaf_{i:05d}": tuple(shape) for i in range(n)}


FULL_TREES = {
    "leaf16M": TreeSpec("leaf16M", "one 4096x4096 leaf (16.8M params)", lambda: single_leaf(4096, 4096)),
    "tf12x512": TreeSpec("tf12x512", "transformer 12 layers x d=512 (+32k vocab embed)",
                         lambda: transformer(12, 512)),
    "tf24x384": TreeSpec("tf24x384", "transformer 24 layers x d=384 (+32k vocab embed)",
                         lambda: transformer(24, 384)),
    "leaves1000": TreeSpec("leaves1000", "1,000 leaves of 64x64", lambda: many_leaves(1000)),
    "leaves3000": TreeSpec("leaves3000", "3,000 leaves of 64x64", lambda: many_leaves(3000)),
}

QUICK_TREES = {
    "leaf1M": TreeSpec("leaf1M", "one 1024x1024 leaf (1.0M params)", lambda: single_leaf(1024, 1024)),
    "tf2x128": TreeSpec("tf2x128", "transformer 2 layers x d=128 (+4k vocab embed)",
                        lambda: transformer(2, 128, vocab=4096)),
    "leaves100": TreeSpec("leaves100", "100 leaves of 64x64", lambda: many_leaves(100)),
}

ALL_TREES = {**FULL_TREES, **QUICK_TREES}


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def materialize(shape_tree: dict, seed: int, scale: float = 1.0, dtype=np.float32) -> dict:
    """Draw a tree of arrays with the given shapes (seeded normal * ``scale``) on the default device."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shape_tree, is_leaf=_is_shape)
    arrays = [(rng.standard_normal(s, dtype=np.float32) * np.float32(scale)).astype(dtype)
              for s in leaves]
    return jax.tree.unflatten(treedef, jax.device_put(arrays))


def count(shape_tree: dict) -> tuple[int, int]:
    """(number of parameters, number of leaves) of a shape tree."""
    leaves = jax.tree.leaves(shape_tree, is_leaf=_is_shape)
    return int(sum(int(np.prod(s)) for s in leaves)), len(leaves)


def tree_nbytes(tree) -> int:
    """Sum of ``nbytes`` over the array leaves of a tree (scalars and counters included)."""
    return int(sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree)))
