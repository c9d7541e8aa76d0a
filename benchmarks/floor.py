"""The bandwidth floor and the null step, measured on the same trees as the optimizers.

**Floor.** For an optimizer whose single fused pass must read ``R`` parameter-sized arrays and write
``W`` of them (AdamW: read p, g, m, v; write p, m, v), the floor is a jitted elementwise function
that moves exactly those arrays: every written array is updated in place (donated) from itself, and
the read-only arrays are folded into the first written one. Each input is read by exactly one output,
so however XLA splits the work into loops, the floor moves ``R`` reads and ``W`` writes and no more.
An optimizer step can not be faster than its floor without moving fewer bytes; ``floor / step`` is
the fraction of the attainable bandwidth the optimizer reaches.

**Null step.** The identity function on the same arguments, donated: the cost of passing the pytree
into a compiled call and back (per-leaf dispatch overhead) with no memory traffic at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.suite import Traffic
from benchmarks.timing import JaxStep

_KEEP = 0.999
_MIX = 1e-3


def floor_fn(written: tuple, read_only: tuple) -> tuple:
    """One elementwise pass: ``w0 <- 0.999*w0 + 1e-3*sum(read_only)``, ``wi <- 0.999*wi``.

    Arithmetic is done in float32 and cast back to each array's dtype (as an optimizer does).
    """
    def first(x, *others):
        acc = x.astype(jnp.float32) * _KEEP
        for o in others:
            acc = acc + o.astype(jnp.float32) * _MIX
        return acc.astype(x.dtype)

    def rest(x):
        return (x.astype(jnp.float32) * _KEEP).astype(x.dtype)

    out = [jax.tree.map(first, written[0], *read_only)]
    out += [jax.tree.map(rest, t) for t in written[1:]]
    return tuple(out)


def null_fn(written: tuple, read_only: tuple) -> tuple:
    """Identity on the donated arrays (the read-only ones are passed in and ignored)."""
    del read_only
    return written


def _materialize(struct_tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jax.device_put(
            (rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.01)).astype(s.dtype)),
        struct_tree)


class TrafficStep(JaxStep):
    """A floor (``null=False``) or null (``null=True``) candidate for the given traffic."""

    def __init__(self, label: str, traffic: Traffic, null: bool = False, seed: int = 7):
        written = tuple(_materialize(t, seed + i) for i, t in enumerate(traffic.written))
        read_only = tuple(_materialize(t, seed + 100 + i) for i, t in enumerate(traffic.read_only))
        self.traffic = traffic
        self.bytes_moved = 0 if null else traffic.bytes_moved()
        fn = null_fn if null else floor_fn
        super().__init__(label, "null" if null else "floor", fn, (written, read_only), n_donated=1)

    @property
    def written(self):
        return self.args[0]
