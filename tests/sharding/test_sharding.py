"""gradtx.sharding: single-device unit tests, plus the 8-device, orbax and multi-process checks.

Multi-device behaviour needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (or several
processes) before JAX starts, so those checks run as scripts in subprocesses and this file asserts
that they succeed and print their summaries.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import gradtx
import gradtx.sharding as gs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # 8 simulated devices on a small shared machine: one thread per device keeps it fast.
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env.update(extra)
    return env


def _run(args, timeout=400, **env):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


# ------------------------------------------------------------------ single-device unit tests

PARAMS = {"w": jax.ShapeDtypeStruct((8, 256), jnp.float32),
          "sq": jax.ShapeDtypeStruct((16, 16), jnp.float32),
          "b": jax.ShapeDtypeStruct((256,), jnp.bfloat16)}
SPECS = {"w": P("data", "model"), "sq": P("data", "model"), "b": P("model")}


def test_specs_mirror_parameters_and_replicate_scalars():
    specs = gs.state_partition_specs(gradtx.adamw(1e-3, mu_dtype="float32"), PARAMS, SPECS)
    adam = specs[0]
    assert adam.mu == SPECS and adam.nu == SPECS
    assert adam.count == P() and adam.mu_product == P()
    assert specs[1].count == P() and specs[2].count == P()


def test_factored_statistics_drop_the_reduced_axis():
    tx = gradtx.adafactor(1e-2, min_dim_size_to_factor=8)
    specs = gs.state_partition_specs(tx, PARAMS, SPECS)[0]
    assert specs.v_row["w"] == P("data") and specs.v_col["w"] == P("model")
    # Square matrix: the shape cannot tell; the field name decides (rows keep axis 0).
    assert specs.v_row["sq"] == P("data") and specs.v_col["sq"] == P("model")
    assert specs.v["b"] == P("model") and specs.v["w"] == P()         # (0,) placeholder
    abstract = jax.eval_shape(tx.init, PARAMS)[0]
    assert abstract.v_row["sq"].shape == (16,) and abstract.v_col["w"].shape == (256,)


def test_longest_path_suffix_wins_and_masks_work():
    params = {"a": {"b": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
              "b": jax.ShapeDtypeStruct((4, 8), jnp.float32)}
    specs = {"a": {"b": P("x")}, "b": P(None, "y")}
    tx = gradtx.masked(gradtx.scale_by_lion(), {"a": {"b": True}, "b": False})
    out = gs.state_partition_specs(tx, params, specs)
    leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    assert [(jax.tree_util.keystr(k), v) for k, v in leaves] == [
        (".inner_state.mu['a']['b']", P("x"))]
    out = gs.state_partition_specs(gradtx.trace(0.9), params, specs)
    assert out.trace == specs


def test_flax_nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    specs = jax.tree.map(lambda x: P(None, "model") if x.ndim == 2 else P("model"), params)
    out = gs.state_partition_specs(gradtx.adamw(1e-3), params, specs)
    assert jax.tree.leaves(out[0].mu) == [P("model"), P(None, "model")]


def test_state_shardings_init_and_zero_on_one_device():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
    params = jax.tree.map(lambda a, s: jnp.ones(a.shape, a.dtype, device=s), PARAMS, sh)
    tx = gradtx.lamb(1e-3)
    state = gs.init(tx, params)
    planned = gs.state_shardings(tx, params)
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, state, planned))
    assert state[0].nu["w"].sharding.spec == P("data", "model")
    # PartitionSpecs + mesh give the same plan.
    assert gs.state_shardings(tx, PARAMS, SPECS, mesh=mesh) == planned
    zero = gs.zero_shardings(tx, PARAMS, mesh, "data", SPECS)[0]
    assert zero.mu["b"].spec == P(("model", "data"))    # the only dim; data added to it
    assert zero.mu["w"].spec == P("data", "model")      # already uses data: unchanged
    plain = {"w": jnp.zeros((3, 8)), "v": jnp.zeros(5)}
    zero = gs.zero_shardings(gradtx.adamw(1e-3), plain, jax.make_mesh((1,), ("data",)))[0]
    assert zero.mu["w"].spec == P(None, "data") and zero.mu["v"].spec == P("data")


def test_zero_partition_rule():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    params = {"odd": jax.ShapeDtypeStruct((6, 10), jnp.float32),       # nothing divisible by 4
              "w": jax.ShapeDtypeStruct((12, 64), jnp.float32),
              "tp": jax.ShapeDtypeStruct((64, 8), jnp.float32)}
    specs = {"odd": P(), "w": P(), "tp": P("model")}
    out = gs.partitioned_shardings(params, mesh, "data", specs)
    assert out["odd"].spec == P() and out["w"].spec == P(None, "data")
    assert out["tp"].spec == P(("model", "data"))       # 64/2 = 32 per device > 8
    small = gs.partitioned_shardings(params, mesh, "data", specs, min_size=1000)
    assert small["w"].spec == P() and small["tp"].spec == P("model")   # both < 1000 elements
    with pytest.raises(ValueError, match="axis='fsdp'"):
        gs.partitioned_shardings(params, mesh, "fsdp", specs)


def test_per_device_bytes_counts_shards():
    mesh = jax.sharding.AbstractMesh((4,), ("data",))
    tree = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "c": jax.ShapeDtypeStruct((), jnp.int32)}
    sh = {"w": NamedSharding(mesh, P("data")), "c": NamedSharding(mesh, P())}
    with pytest.raises(Exception):          # an abstract mesh has no devices to count on
        gs.per_device_bytes(tree, sh)
    one = jax.make_mesh((1,), ("data",))
    sh = {"w": NamedSharding(one, P("data")), "c": NamedSharding(one, P())}
    assert gs.per_device_bytes(tree, sh) == 8 * 4 * 4 + 4


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="structure of `params`"):
        gs.state_partition_specs(gradtx.adamw(1e-3), PARAMS, {"w": P()})
    with pytest.raises(ValueError, match="rank 1"):
        gs.state_partition_specs(gradtx.adamw(1e-3), PARAMS, {**SPECS, "b": P("a", "b")})
    with pytest.raises(ValueError, match="mesh="):
        gs.state_shardings(gradtx.adamw(1e-3), PARAMS, SPECS)


# ------------------------------------------------------------------ subprocess checks

def test_eight_devices_layouts_hlo_and_zero():
    proc, out = _run(["tests/sharding/_multidevice_checks.py"])
    assert proc.returncode == 0, out[-4000:]
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    for opt in ("adamw", "lamb", "lion", "adafactor"):
        for layout in ("data-parallel", "fsdp", "2d", "zero2", "2d+zero"):
            assert f"{opt}/{layout}: equals the single-device run" in out, (opt, layout, out)
    for needle in ("adamw: state bytes/device replicated=20880 zero=2624",
                   "ZeRO 64.02 MiB/device (ratio 0.1250)", "HLO update 2d/lamb: {'all-reduce': [1]}",
                   "HLO update fsdp/adamw: {}"):
        assert needle in out, (needle, out[-4000:])


def test_orbax_restore_onto_a_different_mesh(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    proc, out = _run(["tests/sharding/_checkpoint_checks.py", str(tmp_path)])
    assert proc.returncode == 0, out[-4000:]
    assert "CHECKPOINT CHECKS PASSED" in out and "lamb: restored" in out, out[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_zero_training(tmp_path):
    port = str(_free_port())
    worker = os.path.join("tests", "sharding", "_multiprocess_worker.py")
    env = _env(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, outs[i]], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    texts = []
    for p in procs:
        try:
            texts.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run timed out:\n" + "\n".join(texts))
    unsupported = [line for t in texts for line in t.splitlines() if line.startswith("UNSUPPORTED:")]
    if unsupported:
        pytest.skip(unsupported[0])
    print("\n".join(texts))                    # visible with pytest -s
    for p, t in zip(procs, texts):
        assert p.returncode == 0, t[-4000:]
        assert "DONE" in t and "rel err vs single process" in t, t[-4000:]
    a, b = np.load(outs[0]), np.load(outs[1])
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 8
    for key in a.files:                       # both processes hold identical parameters
        np.testing.assert_array_equal(a[key], b[key])
