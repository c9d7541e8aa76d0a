"""The benchmark loop: for each tree, for each optimizer, build gradtx / Optax / torch candidates
next to the floor and null step for that optimizer's traffic, check they agree, time them together.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import trees as trees_mod
from benchmarks.floor import TrafficStep
from benchmarks.suite import SPECS, OptimizerSpec, Traffic
from benchmarks.timing import Candidate, OptimizerStep, measure


@dataclasses.dataclass
class Settings:
    warmup: int = 3
    reps: int = 25
    time_budget_s: float | None = 60.0    # per optimizer group; never fewer than 5 rounds
    torch: bool = True
    optax: bool = True
    check_agreement: bool = True
    log: Any = print


def _null_traffic(params) -> Traffic:
    p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), params)
    return Traffic(written=(p,), read_only=())


@jax.jit
def _delta_stats(p0, pa, pb):
    """max |(pa - p0) - (pb - p0)| and max |pb - p0| over a tree."""
    da = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), pa, pb)
    db = jax.tree.map(lambda a, b: jnp.max(jnp.abs(b - a)), p0, pb)
    return jnp.max(jnp.stack(jax.tree.leaves(da))), jnp.max(jnp.stack(jax.tree.leaves(db)))


def relative_disagreement(p0, pa, pb) -> float:
    """max|pa - pb| / max|pb - p0|: 0 when two implementations took the same step from p0."""
    num, den = _delta_stats(p0, pa, pb)
    return float(num) / max(float(den), 1e-30)


def _base_row(tree: str, n_params: int, n_leaves: int, optimizer: str, impl: str) -> dict:
    return dict(tree=tree, tree_params=n_params, tree_leaves=n_leaves, optimizer=optimizer,
                impl=impl, platform=jax.devices()[0].platform, error=None)


def _candidate_row(base: dict, c: Candidate, timing) -> dict:
    row = dict(base)
    row.update(step_ms=timing.median_s * 1e3, step_min_ms=timing.min_s * 1e3,
               step_max_ms=timing.max_s * 1e3, n=timing.n, state_bytes=c.state_bytes)
    info = c.compile_info
    if info is not None:
        row.update(dataclasses.asdict(info))
    if isinstance(c, TrafficStep):
        row["bytes_moved"] = c.bytes_moved
        row["traffic"] = c.traffic.describe()
        if c.bytes_moved:
            row["gbps"] = c.bytes_moved / timing.median_s / 1e9
    return row


def run_optimizer(tree_name: str, params, grads, spec: OptimizerSpec, settings: Settings,
                  floor_cache: dict, gradtx_module, optax_module) -> list[dict]:
    n_params, n_leaves = sum(int(x.size) for x in jax.tree.leaves(params)), len(jax.tree.leaves(params))
    log = settings.log
    if spec.max_leaves is not None and n_leaves > spec.max_leaves:
        msg = f"skipped: more than {spec.max_leaves} leaves ({spec.max_leaves_reason})"
        log(f"    gradtx: {msg}")
        row = _base_row(tree_name, n_params, n_leaves, spec.name, "gradtx")
        row["error"] = msg
        return [row]
    rows, cands, errors = [], [], []
    traffic = spec.traffic(params)
    key = (traffic.describe(),) + tuple((tuple(s.shape), str(s.dtype))
                                        for t in traffic.written + traffic.read_only
                                        for s in jax.tree.leaves(t))
    if key not in floor_cache:
        for f_old, n_old in floor_cache.values():   # keep one floor in memory at a time
            f_old.release(), n_old.release()
        floor_cache.clear()
        floor_cache[key] = (TrafficStep(f"floor[{traffic.describe()}]", traffic),
                            TrafficStep(f"null[{traffic.describe()}]", traffic, null=True))
    floor, null = floor_cache[key]
    cands += [floor, null]

    def build(impl, make):
        try:
            c = make()
            cands.append(c)
            return c
        except Exception as e:  # noqa: BLE001 - a failing implementation is a result, not a crash
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log(f"    {impl}: ERROR {msg}")
            if settings.log is print:
                traceback.print_exc(limit=3)
            errors.append((impl, msg))
            return None

    gx = ox = None
    if gradtx_module is not None and hasattr(gradtx_module, spec.gradtx_name):
        gx = build("gradtx", lambda: OptimizerStep(f"gradtx/{spec.name}", "gradtx",
                                                   spec.make_gradtx(gradtx_module),
                                                   gradtx_module.apply_updates, params, grads))
    else:
        errors.append(("gradtx", f"gradtx.{spec.gradtx_name} is not available"))
    if settings.optax and optax_module is not None and spec.make_optax is not None:
        ox = build("optax", lambda: OptimizerStep(f"optax/{spec.name}", "optax",
                                                  spec.make_optax(optax_module),
                                                  optax_module.apply_updates, params, grads))
    torch_cands = []
    if settings.torch and spec.torch:
        from benchmarks.peers import TorchAdamW, torch_available
        if torch_available():
            for variant in spec.torch:
                t = build(f"torch-{variant}", lambda v=variant: TorchAdamW(
                    f"torch-{v}/{spec.name}", v, params, grads, **spec.torch_kwargs))
                if t is not None:
                    torch_cands.append(t)

    # Agreement after one step from the same params and grads (same hyperparameters => same step).
    agree = {}
    if settings.check_agreement and ox is not None:
        ox.step()
        if gx is not None:
            try:
                gx.step()
                agree["gradtx"] = relative_disagreement(params, gx.params, ox.params)
            except Exception as e:  # noqa: BLE001
                errors.append(("gradtx", f"step failed: {type(e).__name__}: {e}"[:300]))
                cands.remove(gx)
                gx = None
        for t in torch_cands:   # torch took its first step when building its state
            tp = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(a) for a in t.params_numpy()])
            agree[t.kind] = relative_disagreement(params, tp, ox.params)

    compiled = [c for c in cands if c.compile_info is not None and c.kind in ("gradtx", "optax")]
    for c in compiled:
        i = c.compile_info
        log(f"    {c.label}: trace {i.trace_s:.2f}s lower {i.lower_s:.2f}s compile {i.compile_s:.2f}s")
    # JAX candidates are timed in interleaved rounds. Torch runs in its own block afterwards: its
    # OpenMP threads spin-wait after each parallel region and, interleaved with XLA's thread pool
    # on a small machine, the two starve each other (torch foreach was 100x slower interleaved).
    jax_cands = [c for c in cands if c not in torch_cands]
    timings = measure(jax_cands, warmup=settings.warmup, reps=settings.reps,
                      time_budget_s=settings.time_budget_s)
    if torch_cands:
        timings.update(measure(torch_cands, warmup=settings.warmup, reps=settings.reps,
                               time_budget_s=settings.time_budget_s))

    fl_t, nl_t = timings[floor.label], timings[null.label]
    optax_ms = timings[ox.label].median_s * 1e3 if ox is not None else None
    for c in cands:
        impl = c.kind
        base = _base_row(tree_name, n_params, n_leaves, spec.name, impl)
        row = _candidate_row(base, c, timings[c.label])
        row["floor_ms"] = fl_t.median_s * 1e3
        row["null_ms"] = nl_t.median_s * 1e3
        row["floor_traffic"] = traffic.describe()
        row["floor_bytes"] = floor.bytes_moved
        row["floor_fraction"] = fl_t.median_s / timings[c.label].median_s
        row["effective_gbps"] = floor.bytes_moved / timings[c.label].median_s / 1e9
        if optax_ms:
            row["vs_optax"] = row["step_ms"] / optax_ms
        if impl in agree:
            row["rel_diff_vs_optax"] = agree[impl]
        rows.append(row)
        log(f"    {c.label:32s} {row['step_ms']:9.3f} ms  floor/step {row['floor_fraction']:.2f}"
            + (f"  vs optax {row['vs_optax']:.2f}" if optax_ms else ""))
    for impl, msg in errors:
        row = _base_row(tree_name, n_params, n_leaves, spec.name, impl)
        row["error"] = msg
        rows.append(row)
    for c in cands:
        if c not in (floor, null):
            c.release()
    return rows


def run(tree_specs: list, optimizer_names: list[str], settings: Settings,
        gradtx_module=None, optax_module=None, after_tree=None) -> list[dict]:
    """Run every optimizer on every tree; ``after_tree(rows_so_far)`` is called after each tree
    (the CLI uses it to save partial results of a long run)."""
    log = settings.log
    rows: list[dict] = []
    for ts in tree_specs:
        shapes = ts.shape_tree()
        n_params, n_leaves = trees_mod.count(shapes)
        log(f"== {ts.name}: {ts.description}: {n_params:,} params, {n_leaves} leaves")
        t0 = time.perf_counter()
        params = trees_mod.materialize(shapes, seed=0, scale=0.02)
        grads = trees_mod.materialize(shapes, seed=1, scale=0.01)
        floor_cache: dict = {}
        for name in optimizer_names:
            log(f"  -- {name}")
            rows += run_optimizer(ts.name, params, grads, SPECS[name], settings, floor_cache,
                                  gradtx_module, optax_module)
            gc.collect()
        for f, n in floor_cache.values():
            f.release(), n.release()
        del params, grads, floor_cache
        gc.collect()
        log(f"   ({time.perf_counter() - t0:.0f}s for {ts.name})")
        if after_tree is not None:
            after_tree(rows)
    return rows
