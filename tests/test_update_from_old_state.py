"""The update computed from the old state (``gradtx.tree.map_leaves(update_from_old_state=True)``).

On a backend that merges sibling loops only (XLA's CPU backend under ``gradtx.xla_flags("cpu")``)
the state primitives recompute their update from the old state, so that the state writes and the
parameter update become one loop. This process runs with the default flags, where the compiler
probe says no; the tests force the structure to check that it computes the same values (up to
rounding), that it is built exactly where it should be, and that the probe reads HLO correctly.
``tests/test_xla_flags.py`` checks the real thing under the flags in a subprocess.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import compiler
from optimizer_registry import ENTRIES, ENTRY_IDS, PROBLEMS
from test_compiler_options import _trajectory


@pytest.fixture
def forced(monkeypatch):
    """Every trace in the test takes the update from the old state where a primitive allows it."""
    monkeypatch.setattr(compiler, "_merges_siblings_only", lambda backend: True)


def _barriers(tx, params):
    """``optimization_barrier`` equations in the jaxpr of one update."""
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, tx.init(params), params)
    return str(jaxpr).count("optimization_barrier")


@contextlib.contextmanager
def _probe_says(merges: bool):
    """Traces within take the structure the probe would choose if it answered ``merges``."""
    saved = compiler._merges_siblings_only
    compiler._merges_siblings_only = lambda backend: merges
    try:
        yield
    finally:
        compiler._merges_siblings_only = saved


def _recomputed_from(tx, params) -> int:
    """Arrays that the update is recomputed from: the barriers of the forced structure beyond
    those of the plain one (each recomputation passes the gradient and each state array through
    a barrier of its own)."""
    with _probe_says(False):
        plain = _barriers(tx, params)
    with _probe_says(True):
        return _barriers(tx, params) - plain


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's default fusion")
def test_default_cpu_compiler_keeps_the_plain_structure():
    # without multi-output fusion the update from the old state would be a loop of its own that
    # reads the overwritten moments: XLA copies them first, so the probe must say no
    assert compiler._merges_siblings_only("cpu") is False
    assert compiler._update_from_old_state() is False


def test_probe_counts_the_loops_that_write_arrays():
    hlo = """HloModule m

%fused (a: f32[4096]) -> f32[4096] {
  %a = f32[4096]{0} parameter(0)
  ROOT %n = f32[4096]{0} negate(%a)
}

ENTRY %main (p: f32[4096], m: f32[4096], t: s32[]) -> (f32[4096], f32[4096]) {
  %p = f32[4096]{0} parameter(0)
  %inner_fusion = f32[4096]{0} fusion(%p), kind=kLoop, calls=%fused
  %two = (f32[4096]{0}, f32[4096]{0}) fusion(%p, %m), kind=kLoop, calls=%fused
  %count = s32[] fusion(%t), kind=kLoop, calls=%fused
  ROOT %r = (f32[4096]{0}, f32[4096]{0}) tuple(%inner_fusion, %p)
}
"""
    # the two loops writing probe-sized arrays; not the scalar one, nor the nested computation
    assert compiler._array_loops(hlo) == 2


@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_forced_structure_computes_the_same_trajectory(entry, forced):
    dtype = jnp.bfloat16 if entry.supports_bf16_convergence else jnp.float32
    params = PROBLEMS["quadratic"].init(dtype)
    tx = entry.make("quadratic")
    recomputed = _trajectory(tx, params, None)
    with _probe_says(False):
        plain = _trajectory(tx, params, None)
    for step, (a, b) in enumerate(zip(recomputed, plain)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            if not jnp.issubdtype(x.dtype, jnp.floating):
                np.testing.assert_array_equal(x, y)
                continue
            rtol = 2.0 ** -7 if x.dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol,
                                       atol=1e-7, err_msg=f"{entry.name}: step {step + 1}")


def test_forced_adamw_reads_the_old_moments_in_its_update(forced):
    # one barrier per array the update is recomputed from: the gradient, m and v
    assert _recomputed_from(gradtx.adamw(1e-3), {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}) == 6
    tx = gradtx.adamw(1e-3)
    p = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
    u, _ = jax.jit(tx.update)(jnp.cos(p), tx.init(p), p)
    assert np.all(np.isfinite(np.asarray(u))) and float(jnp.max(jnp.abs(u))) > 0


def test_a_recomputed_update_is_not_recomputed_again_down_the_chain():
    params = jnp.ones((8, 8))
    # SGD's momentum reads the raw gradient: its update is recomputed (g and the trace)
    assert _recomputed_from(gradtx.sgd(0.1, momentum=0.9), params) == 2
    # RMSprop's momentum reads RMSprop's recomputed direction (a division by a square root):
    # recomputing from it again would make XLA materialise that direction
    assert _recomputed_from(gradtx.scale_by_rms(), params) == 2
    assert _recomputed_from(gradtx.rmsprop(0.1, momentum=0.9), params) == 2
    # whichever state primitive comes second in a chain reads a recomputed update
    assert _recomputed_from(gradtx.chain(gradtx.trace(0.9), gradtx.scale_by_rms()), params) == 2
    # a stateless transform in front changes nothing: its output is not a recomputed update
    assert _recomputed_from(gradtx.chain(gradtx.scale(2.0), gradtx.scale_by_rms()), params) == 2
    assert _recomputed_from(gradtx.chain(gradtx.scale(2.0), gradtx.trace(0.9),
                                         gradtx.scale_by_rms(), gradtx.trace(0.5)), params) == 2
    # ema is not a state primitive that recomputes: it follows Adafactor's direction (reductions,
    # a division), which two computations would make XLA materialise
    assert _recomputed_from(gradtx.ema(0.9), params) == 0
    assert _recomputed_from(gradtx.adafactor(1e-3, momentum=0.9), jnp.ones((256, 256))) == 0


def test_not_for_decoded_8bit_state_complex_leaves_or_eager_calls():
    big = jnp.ones((64, 128))
    assert _recomputed_from(gradtx.adamw(1e-3), big) == 3
    # quantized_state decodes the moments: recomputing would read the decoding twice
    assert _recomputed_from(gradtx.quantized_state(gradtx.adamw(1e-3), code_map="float8"), big) == 0
    assert _recomputed_from(gradtx.adam(1e-3), jnp.ones(4, jnp.complex64)) == 0
    # outside a trace there is no loop to merge: one computation, as without the option
    calls = []

    def one(g, m):
        calls.append(1)
        return g + m, m * 0.5
    gradtx.tree.map_leaves("demo", one, jnp.ones(3), jnp.ones(3), outputs=2,
                           update_from_old_state=True)
    assert len(calls) == 1
