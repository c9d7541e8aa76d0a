"""Compile-and-measure machinery shared by every candidate (gradtx, Optax, floor, null, torch).

A *candidate* owns its own buffers and exposes ``step()`` (one call, blocked until the results are
ready). :func:`measure` warms every candidate up and then times them in interleaved rounds — one
call of each per round — so that load from other processes on a shared machine hits all of them
alike and the ratios measured in one process stay fair.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks.trees import tree_nbytes


def fresh_copy(tree):
    """A copy of ``tree`` in new device buffers (safe to donate without invalidating ``tree``)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@dataclasses.dataclass
class CompileInfo:
    trace_s: float
    lower_s: float
    compile_s: float
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    peak_bytes: int | None = None
    hlo_copies: int | None = None
    hlo_fusions: int | None = None


_COPY = re.compile(r"=\s*\S+\s+copy\(")
_FUSION = re.compile(r"=\s*\S+\s+fusion\(")


def compile_timed(fn: Callable, args: tuple, donate_argnums=(), count_hlo: bool = True,
                  compiler_options: dict | None = None):
    """AOT-compile ``jax.jit(fn)`` for ``args`` (with ``compiler_options``, e.g.
    :func:`gradtx.compiler_options`), timing trace, lower and compile separately.

    Returns ``(compiled, CompileInfo)``. The memory figures come from XLA's
    ``compiled.memory_analysis()``: ``argument``/``output`` are the buffers passed in and out,
    ``alias`` the part of the output that reuses donated input buffers, ``temp`` the scratch the
    step allocates; ``peak`` is XLA's own peak estimate where the backend reports one, else
    ``argument + output - alias + temp``. ``hlo_copies``/``hlo_fusions`` count ``copy`` and
    ``fusion`` instructions in the optimized HLO (copies of donated buffers cost a full pass).
    """
    jitted = jax.jit(fn, donate_argnums=donate_argnums, compiler_options=compiler_options)
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    info = CompileInfo(trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2)
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        mem = None
    if mem is not None:
        info.temp_bytes = int(mem.temp_size_in_bytes)
        info.argument_bytes = int(mem.argument_size_in_bytes)
        info.output_bytes = int(mem.output_size_in_bytes)
        info.alias_bytes = int(mem.alias_size_in_bytes)
        peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
        info.peak_bytes = peak or (info.argument_bytes + info.output_bytes - info.alias_bytes
                                   + info.temp_bytes)
    if count_hlo:
        try:
            text = compiled.as_text()
            info.hlo_copies = len(_COPY.findall(text))
            info.hlo_fusions = len(_FUSION.findall(text))
        except Exception:  # noqa: BLE001
            pass
    return compiled, info


class Candidate:
    """Something to time: ``step()`` runs once and blocks until its outputs are ready."""

    label: str = ""
    kind: str = ""                  # "gradtx", "optax", "torch-foreach", "floor", "null", ...
    compile_info: CompileInfo | None = None
    state_bytes: int | None = None

    def step(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Drop buffers (called after measuring so the next candidates have memory)."""


class JaxStep(Candidate):
    """``args = fn(*args)``-style candidate: the outputs replace the donated leading arguments."""

    def __init__(self, label: str, kind: str, fn: Callable, args: tuple, n_donated: int,
                 state_bytes: int | None = None, compiler_options: dict | None = None):
        self.label, self.kind = label, kind
        self.n_donated = n_donated
        self.compiled, self.compile_info = compile_timed(
            fn, args, donate_argnums=tuple(range(n_donated)), compiler_options=compiler_options)
        self.args = list(args)
        self.state_bytes = state_bytes

    def step(self) -> None:
        out = self.compiled(*self.args)
        if self.n_donated == 1:
            out = (out,)
        self.args[: self.n_donated] = out
        jax.block_until_ready(out)

    def release(self) -> None:
        self.args = []
        self.compiled = None


def make_optimizer_step(tx, apply_updates: Callable) -> Callable:
    """The benchmarked step: ``update`` then ``apply_updates``; params and state are donated."""
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state
    return step


def own_params_and_state(tx, params):
    """A fresh copy of ``params`` and ``tx``'s state for it, neither sharing a buffer with anything
    (both are donated to the step)."""
    p = fresh_copy(params)
    return p, fresh_copy(jax.jit(tx.init)(p))


class OptimizerStep(JaxStep):
    """A gradtx or Optax optimizer on its own copy of ``params`` (grads are shared, read-only)."""

    def __init__(self, label: str, kind: str, tx, apply_updates: Callable, params, grads,
                 compiler_options: dict | None = None):
        p, state = own_params_and_state(tx, params)
        super().__init__(label, kind, make_optimizer_step(tx, apply_updates), (p, state, grads),
                         n_donated=2, state_bytes=tree_nbytes(state),
                         compiler_options=compiler_options)

    @property
    def params(self):
        return self.args[0]


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    n: int


def measure(candidates: list[Candidate], warmup: int, reps: int,
            time_budget_s: float | None = None) -> dict[str, Timing]:
    """Warm every candidate up, then run ``reps`` interleaved rounds (one timed call each).

    If ``time_budget_s`` is given, rounds stop early once it is spent — but never before 5 rounds.
    Returns ``{label: Timing}`` with per-call median/min/max seconds.
    """
    for c in candidates:
        for _ in range(warmup):
            c.step()
    samples: dict[str, list[float]] = {c.label: [] for c in candidates}
    start = time.perf_counter()
    for r in range(reps):
        for c in candidates:
            t0 = time.perf_counter()
            c.step()
            samples[c.label].append(time.perf_counter() - t0)
        if time_budget_s is not None and r >= 4 and time.perf_counter() - start > time_budget_s:
            break
    return {k: Timing(statistics.median(v), min(v), max(v), len(v)) for k, v in samples.items()}


def time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0
