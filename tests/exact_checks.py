"""Checks shared by the tests of exact (bit-identical) fast paths and of in-place updates."""

from __future__ import annotations

import re

import jax
import numpy as np


def tree_bits_equal(a, b) -> bool:
    """True when two trees have the same structure, dtypes and bit-identical leaves (NaN == NaN)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.tobytes() != y.tobytes():
            return False
    return True


def array_copies(hlo_text: str) -> list[str]:
    """Lines of optimized HLO whose instruction is a ``copy`` of an array (not a fusion named after
    one). Copies of rank-0 buffers (a 0-d parameter's state, a step count) cost nothing and are
    ignored."""
    return [line.strip() for line in hlo_text.splitlines()
            if re.search(r"=\s*\S+\s+copy\(", line) and not re.search(r"=\s*\w+\[\]", line)]
