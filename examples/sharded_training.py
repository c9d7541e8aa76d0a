"""Sharded training of a Flax NNX model with gradtx: FSDP parameters and ZeRO-partitioned state.

    python examples/sharded_training.py            # 8 simulated CPU devices, 300 steps
    python examples/sharded_training.py --tiny     # a few steps on a small model (smoke test)

The script fixes ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts (unless
you set XLA_FLAGS yourself), so it runs anywhere; on a real 8-accelerator host drop that line.

The layout, on a ``(data=4, fsdp=2)`` mesh:

- **parameters** are fully sharded over ``fsdp`` (FSDP): each device keeps 1/2 of each weight and
  gathers the whole weight only while computing (``gradtx.sharding.constrain`` in the loss);
- **optimizer state** (AdamW's two moments) is partitioned over ``data`` as well (ZeRO): each device
  keeps 1/8 of it — ``gradtx.sharding.zero_shardings``;
- **gradients** are reduce-scattered onto the moments' layout and each device updates its slice;
  the updates are re-assembled into the FSDP layout — ``gradtx.sharding.zero_update``;
- the batch is split over both axes;
- the jitted step donates the parameters and the optimizer state: every output keeps its input's
  layout, so XLA writes the new values into the old buffers instead of allocating new ones.

It prints the per-device memory of the parameters and of the optimizer state next to the unsharded
figures, trains, and checks the result against the same training on one device.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, NamedTuple

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import gradtx  # noqa: E402
import gradtx.sharding  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, din: int, width: int, dout: int, depth: int, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(din, width, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, dout, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.gelu(self.inp(x))
        for layer in self.hidden:
            x = x + jax.nn.gelu(layer(x))
        return self.out(x)


def make_data(steps: int, batch: int, din: int, dout: int):
    """A fixed random teacher network to regress on: loss can go to ~0."""
    kx, kw = jax.random.split(jax.random.key(42))
    xs = jax.random.normal(kx, (steps, batch, din))
    teacher = jax.random.normal(kw, (din, dout)) / np.sqrt(din)
    ys = jnp.tanh(xs @ teacher)
    return np.asarray(xs), np.asarray(ys)


def mib(n: int) -> str:
    return f"{n / 2**20:8.3f} MiB"


class Layout(NamedTuple):
    """Where each kind of array lives on the mesh."""

    params: Any      # FSDP: each weight split over `fsdp`
    gathered: Any    # replicated: the whole weights, only while computing
    grads: Any       # the moments' split (over `data` too): gradients are reduce-scattered to it
    state: Any       # ZeRO: the optimizer state split over `data` on top of the FSDP split
    batch: NamedSharding


def make_layout(tx: gradtx.Transform, params, mesh) -> Layout:
    param_sh = gradtx.sharding.partitioned_shardings(params, mesh, "fsdp")
    return Layout(
        params=param_sh,
        gathered=jax.tree.map(lambda _: NamedSharding(mesh, P()), params),
        grads=gradtx.sharding.partitioned_shardings(params, mesh, "data", param_sh),
        state=gradtx.sharding.zero_shardings(tx, params, mesh, "data", param_sh),
        batch=NamedSharding(mesh, P(("data", "fsdp"))),
    )


def mse(graphdef, params, x, y):
    model = nnx.merge(graphdef, params)
    return jnp.mean((model(x) - y) ** 2)


def make_train_step(graphdef, tx: gradtx.Transform, layout: Layout):
    """The sharded step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    It donates ``params`` and ``opt_state``: the new values are written into the old buffers (the
    output layouts equal the input ones, so every buffer can be reused), and the arrays passed in
    are deleted by the call: keep only the returned ones.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y):
        def loss_of(p):   # FSDP: gather the whole weights for the computation only
            return mse(graphdef, gradtx.sharding.constrain(p, layout.gathered), x, y)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = gradtx.sharding.zero_update(
            tx, grads, opt_state, params, partitioned=layout.grads, param_shardings=layout.params)
        params = gradtx.apply_updates(params, updates)
        return gradtx.sharding.constrain(params, layout.params), opt_state, loss

    return train_step


def make_reference_step(graphdef, tx: gradtx.Transform):
    """The same step on one device, unsharded (also donating ``params`` and ``opt_state``)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def reference_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(functools.partial(mse, graphdef))(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return gradtx.apply_updates(params, updates), opt_state, loss

    return reference_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small model")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    width, depth, steps, batch = (64, 1, 4, 16) if args.tiny else (512, 4, 300, 64)
    steps = args.steps or steps
    din, dout = 32, 8

    n = jax.device_count()
    if n % 2:
        raise SystemExit(f"needs an even number of devices, found {n}")
    mesh = jax.make_mesh((n // 2, 2), ("data", "fsdp"))
    print(f"mesh: {dict(mesh.shape)} on {n} {jax.devices()[0].platform} devices")

    model = MLP(din, width, dout, depth, rngs=nnx.Rngs(0))
    graphdef, params0 = nnx.split(model)
    tx = gradtx.adamw(gradtx.schedules.warmup_cosine(
        peak_value=3e-3, warmup_steps=max(1, steps // 10),
        decay_steps_after_warmup=max(1, steps - steps // 10)), weight_decay=1e-4)

    # Layouts: parameters FSDP over `fsdp`; state and gradients additionally over `data` (ZeRO).
    layout = make_layout(tx, params0, mesh)
    state_sh, batch_sh = layout.state, layout.batch

    params = jax.device_put(params0, layout.params)
    opt_state = gradtx.sharding.init(tx, params, state_sh)

    unsharded_params = gradtx.sharding.per_device_bytes(params0)      # one device holds it all
    unsharded_state = gradtx.sharding.per_device_bytes(jax.eval_shape(tx.init, params0))
    print(f"parameters:      {mib(gradtx.sharding.per_device_bytes(params))} per device "
          f"(unsharded {mib(unsharded_params)})")
    print(f"optimizer state: {mib(gradtx.sharding.per_device_bytes(opt_state))} per device "
          f"(unsharded {mib(unsharded_state)})")
    print(f"  e.g. kernel {params['inp']['kernel'].shape}: param spec "
          f"{params['inp']['kernel'].sharding.spec}, moment spec "
          f"{opt_state[0].mu['inp']['kernel'].sharding.spec}")

    train_step = make_train_step(graphdef, tx, layout)   # donates params and opt_state

    xs, ys = make_data(steps, batch, din, dout)
    losses = []
    with jax.set_mesh(mesh):
        for t in range(steps):
            params, opt_state, loss = train_step(params, opt_state, jax.device_put(xs[t], batch_sh),
                                                 jax.device_put(ys[t], batch_sh))
            losses.append(float(loss))
            if t % max(1, steps // 6) == 0 or t == steps - 1:
                print(f"step {t:4d}  loss {losses[-1]:.5f}")
    print(f"loss: first {losses[0]:.5f} -> last {losses[-1]:.5f}")
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                                     opt_state, state_sh)), "the state left its layout"

    # The same training on one device, for comparison.
    reference_step = make_reference_step(graphdef, tx)
    ref, ref_state = params0, tx.init(params0)    # params0 is donated: not used after this
    for t in range(steps):
        ref, ref_state, _ = reference_step(ref, ref_state, xs[t], ys[t])
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
    print(f"max |sharded - single-device| parameter difference: {err:.2e}")
    if err > 1e-4:
        raise SystemExit("the sharded run does not match the single-device run")
    print("matches the single-device run")


if __name__ == "__main__":
    main()
