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


def distinct_computations(hlo_text: str) -> int:
    """How many different computations (fused computations, reduction bodies, ...) an optimized
    HLO module holds besides its entry, comparing bodies without names and metadata.

    XLA's CPU backend compiles each distinct computation on its own (~10 ms each on the 2-core
    CPU), while computations that differ only in which buffers they read share the work: a step
    over many same-shaped leaves compiles fast only if each leaf's loops are the same
    computations, with nothing leaf-specific (a position, an offset) baked in as a constant."""
    bodies = set()
    for block in re.split(r"\n(?=%\S+ \()", hlo_text.split("\nENTRY")[0]):
        if block.startswith("%") and "{" in block:
            body = re.sub(r"metadata=\{[^}]*\}", "", block.split("{", 1)[1])
            bodies.add(re.sub(r"%[\w.\-]+", "%x", body))
    return len(bodies)


def full_size_temporaries(hlo_text: str, shape: tuple, dtype: str = "f32") -> list[str]:
    """Instructions of the optimized entry computation that write a fresh ``dtype[shape]`` array
    which is *not* one of the program's outputs: the parameter-sized temporaries of a step
    (outputs -- new params and state, updated in place when donated -- are not counted)."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    lines = entry.splitlines()
    root = next(line for line in lines if line.strip().startswith("ROOT"))
    outputs = set(re.findall(r"%([\w.-]+)", root.split("=", 1)[1]))
    sig = f"{dtype}[{','.join(map(str, shape))}]"
    found = []
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\S+) ([\w-]+)\(", line)
        if (m and m.group(2).startswith(sig + "{") and m.group(1) not in outputs
                and m.group(3) not in ("parameter", "bitcast", "get-tuple-element")):
            found.append(line.strip())
    return found


def compiled_step_text(tx, params, grads) -> str:
    """Optimized HLO of ``tx``'s jitted training step (``update`` + ``apply_updates``, params and
    state donated) on the given trees."""
    import gradtx

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads) \
        .compile().as_text()


def same_shaped_step_computations(tx, n: int, shape: tuple, dtype=np.float32,
                                  grads=lambda params: params) -> int:
    """:func:`distinct_computations` of ``tx``'s compiled step (:func:`compiled_step_text`) over
    ``n`` leaves of one ``shape`` and ``dtype`` (leaf ``i`` filled with ``0.5 + i``), with the
    gradients ``grads(params)`` (default: the parameters themselves)."""
    import jax.numpy as jnp

    params = {f"w{i}": jnp.full(shape, 0.5 + i, dtype) for i in range(n)}
    return distinct_computations(compiled_step_text(tx, params, grads(params)))


def donated_step_text(tx, shape: tuple, dtype=np.float32) -> str:
    """:func:`compiled_step_text` on one leaf ``{"w": shape}`` of ``dtype``."""
    params = {"w": (0.02 * jax.random.normal(jax.random.PRNGKey(0), shape)).astype(dtype)}
    grads = {"w": (0.01 * jax.random.normal(jax.random.PRNGKey(1), shape)).astype(dtype)}
    return compiled_step_text(tx, params, grads)
