"""Orbax checkpoint of a sharded optimizer state, restored onto a different mesh shape.

Run by tests/sharding/test_sharding.py in a subprocess with 8 simulated CPU devices; argv[1] is
an empty directory for the checkpoint. The last line is the summary the test asserts.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import gradtx  # noqa: E402
import gradtx.sharding as gs  # noqa: E402
from _common import make_batches, make_params, make_step  # noqa: E402

directory = os.path.abspath(sys.argv[1])
params0 = make_params()
xs, ys = make_batches(2)

# Adafactor is not here: its state keeps (0,)-shaped placeholder leaves, which orbax refuses to
# save ("Cannot save arrays with zero size"); see docs/sharding.md.
for name, tx in {"adamw": gradtx.adamw(1e-2), "lamb": gradtx.lamb(1e-2)}.items():
    # Train two steps on a (4, 2) data x model mesh: tensor-parallel params + ZeRO state.
    mesh_a = jax.make_mesh((4, 2), ("data", "model"))
    p_a = {"w1": NamedSharding(mesh_a, P(None, "model")), "b1": NamedSharding(mesh_a, P("model")),
           "w2": NamedSharding(mesh_a, P("model", None)), "b2": NamedSharding(mesh_a, P())}
    s_a = gs.zero_shardings(tx, params0, mesh_a, "data", p_a)
    params = jax.device_put(params0, p_a)
    state = gs.init(tx, params, s_a)
    batch = NamedSharding(mesh_a, P("data"))
    step = jax.jit(make_step(tx, compute_shardings=jax.tree.map(
        lambda _: NamedSharding(mesh_a, P()), params0),
        grad_shardings=gs.partitioned_shardings(params0, mesh_a, "data", p_a),
        param_shardings=p_a), out_shardings=(p_a, s_a))
    for x, y in zip(xs, ys):
        params, state = step(params, state, jax.device_put(x, batch), jax.device_put(y, batch))

    path = os.path.join(directory, name)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)

    # Restore onto a (2, 4) mesh with FSDP-sharded params: plan the target abstractly.
    mesh_b = jax.make_mesh((2, 4), ("data", "fsdp"))
    p_b = gs.partitioned_shardings(params0, mesh_b, "fsdp")
    s_b = gs.zero_shardings(tx, params0, mesh_b, "data", p_b)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(tx.init, params0), s_b)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, target)

    assert jax.tree.structure(restored) == jax.tree.structure(state), (
        jax.tree.structure(restored), jax.tree.structure(state))
    same_values = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                               restored, state)
    assert all(jax.tree.leaves(same_values)), same_values
    layout = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), restored, s_b)
    assert all(jax.tree.leaves(layout)), layout
    moved = [a.sharding.spec for a in jax.tree.leaves(restored) if a.ndim == 2]
    print(f"  {name}: restored {len(jax.tree.leaves(state))} leaves from a (4, 2) mesh onto a "
          f"(2, 4) mesh; 2-D leaf specs {moved}", flush=True)

    # Training continues from the restored state on the new mesh.
    params_b = jax.device_put(jax.tree.map(np.asarray, params), p_b)
    step_b = jax.jit(make_step(
        tx, compute_shardings=jax.tree.map(lambda _: NamedSharding(mesh_b, P()), params0),
        grad_shardings=gs.partitioned_shardings(params0, mesh_b, "data", p_b),
        param_shardings=p_b), out_shardings=(p_b, s_b))
    batch_b = NamedSharding(mesh_b, P("data"))
    new_params, _ = step_b(params_b, restored, jax.device_put(xs[0], batch_b),
                           jax.device_put(ys[0], batch_b))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(new_params))

print("CHECKPOINT CHECKS PASSED", flush=True)
