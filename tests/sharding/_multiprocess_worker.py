"""One of two processes of the multi-process ZeRO test (tests/sharding/test_sharding.py).

Usage: python _multiprocess_worker.py PROCESS_ID PORT OUT.npz
Each process owns 4 simulated CPU devices; together they form an 8-device data-parallel mesh with
replicated params and optimizer state partitioned over it (ZeRO-2). The process trains 3 steps,
checks its result against a single-process run on its own first device, and saves its params.
If the platform cannot run multi-process CPU collectives, the first line printed starts with
``UNSUPPORTED:`` followed by the exact error, and the process exits 0.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import numpy as np  # noqa: E402

process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]

try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=90)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
except Exception as e:  # noqa: BLE001 - reported verbatim to the test, which skips
    print(f"UNSUPPORTED: jax.distributed with CPU gloo collectives: {type(e).__name__}: {e}",
          flush=True)
    sys.exit(0)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import gradtx  # noqa: E402
import gradtx.sharding as gs  # noqa: E402
from _common import (make_batches, make_params, make_step, max_rel_err,  # noqa: E402
                     reference_run)


def global_array(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


params_host = jax.tree.map(np.asarray, make_params())
xs, ys = make_batches(3)
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
replicated = NamedSharding(mesh, P())
batch = NamedSharding(mesh, P("data"))
results = {}
for name, tx in {"adamw": gradtx.adamw(1e-2, weight_decay=1e-2),
                 "lamb": gradtx.lamb(1e-2, weight_decay=1e-2)}.items():
    reference = reference_run(tx, params_host, xs, ys, device=jax.local_devices()[0])
    p_sh = jax.tree.map(lambda _: replicated, params_host)
    s_sh = gs.zero_shardings(tx, params_host, mesh, "data")
    params = jax.tree.map(global_array, params_host, p_sh)
    state = gs.init(tx, params, s_sh)
    step = jax.jit(make_step(tx, grad_shardings=gs.partitioned_shardings(params_host, mesh)),
                   in_shardings=(p_sh, s_sh, batch, batch), out_shardings=(p_sh, s_sh))
    for x, y in zip(xs, ys):
        params, state = step(params, state, global_array(x, batch), global_array(y, batch))
    local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
    err = max_rel_err(local, reference)
    assert err < 2e-5, (name, err)
    mu = state[0].mu["w1"]
    shard_rows = {tuple(s.data.shape) for s in mu.addressable_shards}
    assert shard_rows == {(8, 32)}, shard_rows          # 1/8 of the (64, 32) moment per device
    held = sum(s.data.size for s in jax.tree.leaves(jax.tree.map(
        lambda a: a.addressable_shards[0], state[0].mu)))
    total = sum(a.size for a in jax.tree.leaves(state[0].mu))
    print(f"process {process_id}: {name} ZeRO-2 over 2 processes x 4 devices; rel err vs "
          f"single process {err:.1e}; mu elements per device {held}/{total}", flush=True)
    for key, value in local.items():
        results[f"{name}/{key}"] = value

np.savez(out_path, **results)
jax.distributed.shutdown()
print(f"process {process_id}: DONE", flush=True)
