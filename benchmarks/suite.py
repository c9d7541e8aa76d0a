"""The optimizers under test, their Optax / torch equivalents and their minimum memory traffic.

Each :class:`OptimizerSpec` builds the gradtx optimizer and the peer with the *same*
hyperparameters, and states the arrays one fused pass of that optimizer must read and write
(``traffic``): that is what the bandwidth floor of :mod:`benchmarks.floor` moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

F32 = np.dtype("float32")
BF16 = np.dtype(jnp.bfloat16)
U8 = np.dtype("uint8")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Arrays a single pass must move, as trees of ``jax.ShapeDtypeStruct``.

    ``written`` are read *and* written in place (params and per-parameter state); ``read_only`` are
    only read (the gradient). The first written tree and every read-only tree share the params'
    structure.
    """

    written: tuple
    read_only: tuple

    def bytes_moved(self) -> int:
        def nbytes(tree):
            return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree))
        return 2 * sum(nbytes(t) for t in self.written) + sum(nbytes(t) for t in self.read_only)

    def arrays(self) -> tuple[int, int]:
        """(param-sized arrays read, param-sized arrays written) — e.g. (4, 3) for AdamW."""
        return len(self.written) + len(self.read_only), len(self.written)

    def describe(self) -> str:
        r, w = self.arrays()
        return f"{r}r/{w}w"


def _like(params, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), dtype), params)


def elementwise_traffic(n_moments: int, moment_dtypes=None) -> Callable:
    """Traffic of an elementwise optimizer with ``n_moments`` per-parameter moments: read p, g and
    the moments, write p and the moments."""
    dtypes = moment_dtypes or (F32,) * n_moments

    def traffic(params):
        p = _like(params, F32)
        return Traffic(written=(p,) + tuple(_like(params, d) for d in dtypes), read_only=(p,))
    return traffic


def adafactor_factored_dims(shape, min_dim_size_to_factor=128):
    """The two dimensions Adafactor factors (the two largest), or None when the leaf keeps a full
    second moment (fewer than two dims, or the second largest below ``min_dim_size_to_factor``)."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def adafactor_traffic(params):
    """Adafactor's minimum: read p, g; write p; factored leaves keep row + column statistics
    (negligible, counted exactly), other leaves keep a full second moment (read and written)."""
    p = _like(params, F32)

    def stats(x):
        shape = tuple(jnp.shape(x))
        dims = adafactor_factored_dims(shape)
        if dims is None:
            return jax.ShapeDtypeStruct(shape, F32)
        n = int(np.prod(shape))
        return jax.ShapeDtypeStruct((n // shape[dims[0]] + n // shape[dims[1]],), F32)
    return Traffic(written=(p, jax.tree.map(stats, params)), read_only=(p,))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    description: str
    gradtx_name: str                       # attribute of the gradtx module that must exist
    make_gradtx: Callable[[Any], Any]      # gradtx module -> transform
    make_optax: Callable[[Any], Any] | None  # optax module -> GradientTransformation (None: no peer)
    traffic: Callable[[Any], Traffic]
    torch: tuple = ()                      # names of torch variants to run ("foreach", "fused")
    torch_kwargs: dict = dataclasses.field(default_factory=dict)
    # trees with more leaves are skipped (reported as an error row, not run), with this reason
    max_leaves: int | None = None
    max_leaves_reason: str = ""


LR = 1e-3

SPECS = {
    "sgd_nesterov": OptimizerSpec(
        "sgd_nesterov", "SGD lr=1e-3, momentum=0.9, nesterov", "sgd",
        lambda gt: gt.sgd(LR, momentum=0.9, nesterov=True),
        lambda ox: ox.sgd(LR, momentum=0.9, nesterov=True),
        elementwise_traffic(1)),
    "adam": OptimizerSpec(
        "adam", "Adam lr=1e-3 (b1 .9, b2 .999, eps 1e-8)", "adam",
        lambda gt: gt.adam(LR), lambda ox: ox.adam(LR), elementwise_traffic(2)),
    "adamw": OptimizerSpec(
        "adamw", "AdamW lr=1e-3, weight_decay=1e-4", "adamw",
        lambda gt: gt.adamw(LR, weight_decay=1e-4), lambda ox: ox.adamw(LR, weight_decay=1e-4),
        elementwise_traffic(2), torch=("foreach", "fused"),
        torch_kwargs=dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)),
    "adamw_flat": OptimizerSpec(
        "adamw_flat", "AdamW as above through gradtx.flatten (state: one buffer per dtype); "
        "Optax's peer is its plain AdamW", "flatten",
        lambda gt: gt.flatten(gt.adamw(LR, weight_decay=1e-4)),
        lambda ox: ox.adamw(LR, weight_decay=1e-4), elementwise_traffic(2)),
    "adamw_bf16mu": OptimizerSpec(
        "adamw_bf16mu", "AdamW as above, first moment stored in bfloat16", "adamw",
        lambda gt: gt.adamw(LR, weight_decay=1e-4, mu_dtype=jnp.bfloat16),
        lambda ox: ox.adamw(LR, weight_decay=1e-4, mu_dtype=jnp.bfloat16),
        elementwise_traffic(2, (BF16, F32))),
    "adamw_8bit": OptimizerSpec(
        "adamw_8bit", "AdamW as above, both moments in 8-bit block-wise state (quantized_state, "
        "stochastic rounding); Optax has no equivalent", "quantized_state",
        lambda gt: gt.quantized_state(gt.adamw(LR, weight_decay=1e-4)), None,
        elementwise_traffic(2, (U8, U8)), max_leaves=400,
        max_leaves_reason="XLA compiles each quantized leaf separately (~0.14 s and ~12 MB of "
        "compiler memory per leaf; 1,000 leaves exhausted 24 GB); adamw_8bit_flat is the "
        "many-leaf variant"),
    "adamw_8bit_float8": OptimizerSpec(
        "adamw_8bit_float8", "adamw_8bit with code_map='float8' (an 8-bit float: integer-op "
        "encoder and decoder); Optax has no equivalent", "quantized_state",
        lambda gt: gt.quantized_state(gt.adamw(LR, weight_decay=1e-4), code_map="float8"), None,
        elementwise_traffic(2, (U8, U8)), max_leaves=400,
        max_leaves_reason="XLA compiles each quantized leaf separately (about half the dynamic "
        "map's compile time and memory, still superlinear); adamw_8bit_flat is the many-leaf "
        "variant"),
    "adamw_8bit_flat": OptimizerSpec(
        "adamw_8bit_flat", "adamw_8bit through gradtx.flatten: one quantized buffer per dtype "
        "(blocks may span leaf boundaries); Optax has no equivalent", "flatten",
        lambda gt: gt.flatten(gt.quantized_state(gt.adamw(LR, weight_decay=1e-4))), None,
        elementwise_traffic(2, (U8, U8))),
    "lamb": OptimizerSpec(
        "lamb", "LAMB lr=1e-3, eps=1e-6, weight_decay=0", "lamb",
        lambda gt: gt.lamb(LR, eps=1e-6, weight_decay=0.0),
        lambda ox: ox.lamb(LR, eps=1e-6, weight_decay=0.0), elementwise_traffic(2)),
    "lion": OptimizerSpec(
        "lion", "Lion lr=1e-4, b1 .9, b2 .99, weight_decay=1e-3", "lion",
        lambda gt: gt.lion(1e-4, b1=0.9, b2=0.99, weight_decay=1e-3),
        lambda ox: ox.lion(1e-4, b1=0.9, b2=0.99, weight_decay=1e-3), elementwise_traffic(1)),
    "adafactor": OptimizerSpec(
        "adafactor", "Adafactor lr=1e-2 (Optax defaults otherwise: decay 0.8, clip 1.0, "
        "param scale)", "adafactor",
        lambda gt: gt.adafactor(1e-2), lambda ox: ox.adafactor(1e-2), adafactor_traffic),
    "adabelief": OptimizerSpec(
        "adabelief", "AdaBelief lr=1e-3 (Optax defaults)", "adabelief",
        lambda gt: gt.adabelief(LR), lambda ox: ox.adabelief(LR), elementwise_traffic(2)),
}

# Grouped by traffic so that consecutive optimizers reuse the compiled floor.
DEFAULT_ORDER = ("sgd_nesterov", "lion", "adam", "adamw", "lamb", "adabelief", "adamw_bf16mu",
                 "adamw_8bit", "adamw_8bit_float8", "adafactor")
