"""Smoke test of the benchmark harness's core on a tiny tree (no timing assertions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import floor, harness, suite, timing, trees

# Optax's own code mixes Python floats and int32 counters, which the suite's strict promotion
# rejects; the harness runs under JAX's standard promotion, so these tests do too.
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


TINY = {"w": (256, 256), "b": (7,), "nested": {"v": (3, 5)}}


def _struct(tree, dtype=jnp.float32):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), dtype), tree)


def test_traffic_counts_the_arrays_each_optimizer_must_move():
    params = trees.materialize(TINY, seed=0)
    n = sum(x.size for x in jax.tree.leaves(params))
    adamw = suite.SPECS["adamw"].traffic(params)
    assert adamw.arrays() == (4, 3)                       # read p g m v, write p m v
    assert adamw.bytes_moved() == 7 * 4 * n
    assert suite.SPECS["sgd_nesterov"].traffic(params).arrays() == (3, 2)
    assert suite.SPECS["lion"].traffic(params).bytes_moved() == 5 * 4 * n
    bf16 = suite.SPECS["adamw_bf16mu"].traffic(params)    # m in bf16: 2 bytes read + 2 written
    assert bf16.bytes_moved() == (8 + 4 + 4 + 8) * n          # p rw, g r, m rw (bf16), v rw
    # Adafactor: the 256x256 leaf is factored (row + column stats), the others keep a full moment.
    fac = suite.SPECS["adafactor"].traffic(params)
    stats = fac.written[1]
    assert stats["w"].shape == (512,) and stats["b"].shape == (7,) and stats["nested"]["v"].shape == (3, 5)
    assert suite.adafactor_factored_dims((64, 64)) is None
    assert suite.adafactor_factored_dims((128, 4096)) == (0, 1)


def test_floor_function_reads_every_input_once_and_writes_every_output():
    w = tuple(trees.materialize(TINY, seed=i) for i in range(3))
    ro = (trees.materialize(TINY, seed=9),)
    out = floor.floor_fn(w, ro)
    assert len(out) == 3
    np.testing.assert_allclose(out[0]["w"], 0.999 * w[0]["w"] + 1e-3 * ro[0]["w"], rtol=1e-6)
    np.testing.assert_allclose(out[2]["nested"]["v"], 0.999 * w[2]["nested"]["v"], rtol=1e-6)
    assert floor.null_fn(w, ro) is w


def test_floor_is_compiled_in_place_and_null_moves_nothing():
    params = trees.materialize(TINY, seed=0)
    traffic = suite.SPECS["adamw"].traffic(params)
    f = floor.TrafficStep("floor", traffic)
    n = floor.TrafficStep("null", traffic, null=True)
    written_bytes = sum(trees.tree_nbytes(t) for t in f.written)
    assert f.bytes_moved == 7 * trees.tree_nbytes(params) and n.bytes_moved == 0
    info = f.compile_info
    assert info.compile_s > 0 and info.trace_s > 0
    if info.alias_bytes is not None:                      # donated: outputs reuse the inputs
        assert info.alias_bytes == written_bytes
        assert info.hlo_copies == 0
    before = [np.asarray(x) for x in jax.tree.leaves(f.written)]
    f.step()
    after = [np.asarray(x) for x in jax.tree.leaves(f.written)]
    assert not np.allclose(before[0], after[0])            # it really ran


def test_optimizer_rows_have_the_expected_fields():
    optax = pytest.importorskip("optax")
    import gradtx
    params = trees.materialize(TINY, seed=0, scale=0.02)
    grads = trees.materialize(TINY, seed=1, scale=0.01)
    settings = harness.Settings(warmup=1, reps=2, time_budget_s=None, torch=False,
                                log=lambda *a: None)
    rows = harness.run_optimizer("tiny", params, grads, suite.SPECS["adamw"], settings, {},
                                 gradtx, optax)
    by_impl = {r["impl"]: r for r in rows}
    assert {"floor", "null", "optax", "gradtx"} <= set(by_impl)
    for impl in ("floor", "null", "optax", "gradtx"):
        r = by_impl[impl]
        assert r["error"] is None, r["error"]
        assert r["step_ms"] > 0 and r["step_min_ms"] <= r["step_ms"] <= r["step_max_ms"]
        assert r["n"] == 2 and r["compile_s"] > 0 and r["floor_ms"] > 0 and r["floor_fraction"] > 0
        assert r["tree_leaves"] == 3 and r["tree_params"] == 256 * 256 + 7 + 15
    n_bytes = trees.tree_nbytes(params)
    assert by_impl["optax"]["state_bytes"] >= 2 * n_bytes
    assert by_impl["gradtx"]["state_bytes"] >= 2 * n_bytes
    assert by_impl["gradtx"]["rel_diff_vs_optax"] < 1e-3   # same hyperparameters, same step
    assert by_impl["floor"]["bytes_moved"] == 7 * n_bytes


def test_spec_with_a_leaf_limit_is_skipped_on_bigger_trees_without_compiling():
    import dataclasses
    import gradtx
    params = trees.materialize(TINY, seed=0, scale=0.02)       # 3 leaves
    compiled = []

    def make(gt):
        compiled.append(True)
        return gt.adamw(1e-3)
    spec = dataclasses.replace(suite.SPECS["adamw"], make_gradtx=make, make_optax=None,
                               torch=(), max_leaves=2, max_leaves_reason="too many for this test")
    settings = harness.Settings(warmup=1, reps=2, time_budget_s=None, torch=False,
                                log=lambda *a: None)
    rows = harness.run_optimizer("tiny", params, params, spec, settings, {}, gradtx, None)
    assert not compiled
    assert len(rows) == 1 and rows[0]["impl"] == "gradtx"
    assert "more than 2 leaves" in rows[0]["error"] and "too many for this test" in rows[0]["error"]
    assert suite.SPECS["adamw_8bit"].max_leaves is not None
    assert suite.SPECS["adamw_8bit_flat"].max_leaves is None


def test_optimizer_step_donates_params_and_state():
    optax = pytest.importorskip("optax")
    params = trees.materialize(TINY, seed=0)
    grads = trees.materialize(TINY, seed=1)
    c = timing.OptimizerStep("o", "optax", optax.adam(1e-3), optax.apply_updates, params, grads)
    old = c.params
    c.step()
    assert all(x.is_deleted() for x in jax.tree.leaves(old))      # donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # caller's tree untouched
    t = timing.measure([c], warmup=0, reps=3)["o"]
    assert t.n == 3 and 0 < t.min_s <= t.median_s <= t.max_s


def test_flat_params_benchmark_rows_and_layouts_train_the_same():
    import gradtx
    from benchmarks import flat_params
    libraries = {"gradtx": (lambda: gradtx.adamw(1e-3, weight_decay=1e-4),
                            gradtx.apply_updates)}
    rows = flat_params.rows_for(4, libraries, reps=2, log=lambda *a: None)
    assert [r["candidate"] for r in rows] == ["gradtx tree", "gradtx flat"]
    assert all(r["ms"] > 0 and r["compile_s"] > 0 and r["ref"] == "gradtx tree" for r in rows)
    assert rows[0]["ratio"] == 1.0
    text = flat_params.markdown(rows, "cmd", 1.0, None, None)
    assert "| 4 | gradtx flat |" in text
    # the two layouts run the same training step: same parameters after a few steps
    from jax.flatten_util import ravel_pytree
    params, loss = flat_params.problem(4)
    flat, unravel = ravel_pytree(params)
    tx = gradtx.adamw(1e-2)
    tree_step = jax.jit(flat_params.train_step(tx, gradtx.apply_updates, loss))
    flat_step = jax.jit(flat_params.train_step(tx, gradtx.apply_updates,
                                               lambda f: loss(unravel(f))))
    p, s, f, fs = params, tx.init(params), flat, tx.init(flat)
    for _ in range(3):
        p, s = tree_step(p, s)
        f, fs = flat_step(f, fs)
    np.testing.assert_allclose(np.asarray(ravel_pytree(p)[0]), np.asarray(f), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(f), np.asarray(flat))
