"""Every example's jitted training step donates the parameters and the optimizer state.

Each test drives the example's own step function (imported from ``examples/``, not a copy) for one
step and checks that every parameter and optimizer-state array passed in was consumed: JAX deletes
a donated input exactly when XLA reused its buffer for an output (a donation it cannot use leaves
the input alive and warns, which ``filterwarnings = error`` turns into a failure). The returned
values must be usable: evaluation code reads those, never the donated inputs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def example(name: str):
    """Import ``examples/<name>.py`` (the file users run) as a module."""
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def arrays(*trees) -> list[jax.Array]:
    leaves = jax.tree.leaves([nnx.state(t) if isinstance(t, nnx.Object) else t for t in trees])
    return [x for x in leaves if isinstance(x, jax.Array)]


def assert_consumed(old: list[jax.Array], what: str) -> None:
    assert old, f"{what}: no arrays to check"
    alive = [f"{x.dtype}{list(x.shape)}" for x in old if not x.is_deleted()]
    assert not alive, f"{what}: the step did not donate {len(alive)} of {len(old)} arrays: {alive}"


def assert_usable(*trees) -> None:
    for x in arrays(*trees):
        assert not x.is_deleted()
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x)))


def digits_batch(n: int = 16):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.uniform(size=(n, 64)).astype(np.float32)),
            jnp.asarray(rng.integers(0, 10, size=n).astype(np.int32)))


# ---------------------------------------------------------------------------------------------
# Flax NNX: nnx.jit(donate_argnums=(0, 1)) on (model, optimizer, ...)

def _tour():
    tour, common = example("tour"), example("_common")
    model = common.MLP(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tour.optimizers(20)["Custom"], wrt=nnx.Param)
    return tour.train_step, model, optimizer, digits_batch()


def _classifier():
    ex = example("flax_nnx_classifier")
    model, optimizer = ex.make_model_and_optimizer(20)   # AdamW + clipping + ema_params
    return ex.train_step, model, optimizer, digits_batch()


def _transformer():
    ex = example("transformer_lm")
    model = ex.CharLM(vocab=20, context=8, dim=16, heads=2, layers=1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ex.optimizers(10)["AdamW"], wrt=nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 20, size=(2, 9)), jnp.int32)
    return ex.train_step, model, optimizer, (tokens,)


@pytest.mark.parametrize("build", [_tour, _classifier, _transformer],
                         ids=["tour", "flax_nnx_classifier", "transformer_lm"])
def test_nnx_train_step_donates_model_and_optimizer(build):
    train_step, model, optimizer, batch = build()
    params, state = arrays(nnx.state(model, nnx.Param)), arrays(optimizer)
    assert len(state) > len(params)             # moments (and more) per parameter
    inputs = [x for x in arrays(*batch)]
    loss = train_step(model, optimizer, *batch)
    assert np.isfinite(float(loss))
    assert_consumed(params, "parameters")
    assert_consumed(state, "optimizer state")
    assert not any(x.is_deleted() for x in inputs), "the batch must not be donated"
    # nnx.jit wrote the new arrays back into the same objects: they keep working.
    assert_usable(model, optimizer)
    assert np.isfinite(float(train_step(model, optimizer, *batch)))


def test_classifier_evaluation_and_checkpoint_read_the_returned_state():
    ex = example("flax_nnx_classifier")
    model, optimizer = ex.make_model_and_optimizer(20)
    x, y = digits_batch()
    before = ex.digest(nnx.state(optimizer))
    ex.train_step(model, optimizer, x, y)
    acc, ema_acc = ex.evaluate(model, optimizer, x, y)
    assert 0.0 <= float(acc) <= 1.0 and 0.0 <= float(ema_acc) <= 1.0
    assert ex.digest(nnx.state(optimizer)) != before


# ---------------------------------------------------------------------------------------------
# Flax Linen TrainState: jax.jit(donate_argnums=0)

def test_linen_train_step_donates_the_train_state():
    from flax.training.train_state import TrainState

    ex = example("flax_linen_trainstate")
    model = ex.MLP(hidden=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.float32))["params"]
    x, y = digits_batch(8)
    # check_accumulation trains two states from `params` and must leave the caller's copy alive
    # (main builds the real TrainState from it afterwards).
    assert ex.check_accumulation(model, params, np.asarray(x), np.asarray(y), 4) < 1e-5
    assert_usable(params)

    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=ex.gradtx.accumulate_gradients(ex.lamb(1e-2), every_k=2))
    state, _ = ex.train_step(state, x, y)           # step 0 is a Python int before the first call
    # accumulate_gradients' `applied` flag is written, never read: jit drops the unused input, so
    # there is no buffer to donate (one bool). Every other array must be consumed.
    old = arrays(state.replace(opt_state=state.opt_state._replace(applied=None)))
    assert len(old) > 3 * len(jax.tree.leaves(params))   # params, sum of grads, LAMB moments
    new, loss = ex.train_step(state, x, y)
    assert np.isfinite(float(loss))
    assert_consumed(old, "TrainState")
    assert_usable(new)
    assert 0.0 <= float(ex.accuracy(new, x, y)) <= 1.0


# ---------------------------------------------------------------------------------------------
# Pure JAX: custom_optimizer.train donates the parameters it trains

def test_custom_optimizer_train_donates_params():
    ex = example("custom_optimizer")
    params = ex.init_mlp(jax.random.key(0), sizes=(64, 16, 10))
    old = arrays(params)
    x, y = digits_batch(8)
    xs, ys = jnp.stack([x, x]), jnp.stack([y, y])
    new, losses = ex.train(ex.signum_gc(10), params, xs, ys)
    assert losses.shape == (2,) and bool(jnp.all(jnp.isfinite(losses)))
    assert_consumed(old, "parameters")
    assert_usable(new)
    assert not xs.is_deleted() and not ys.is_deleted()


# ---------------------------------------------------------------------------------------------
# Sharded (8 simulated devices, so in a subprocess): FSDP params + ZeRO state, both donated

SHARDED_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import gradtx, gradtx.sharding
    import sharded_training as ex

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    graphdef, params0 = nnx.split(ex.MLP(32, 64, 8, 1, rngs=nnx.Rngs(0)))
    tx = gradtx.adamw(1e-3, weight_decay=1e-4)
    layout = ex.make_layout(tx, params0, mesh)
    params = jax.device_put(params0, layout.params)
    opt_state = gradtx.sharding.init(tx, params, layout.state)
    xs, ys = ex.make_data(1, 16, 32, 8)
    x, y = jax.device_put(xs[0], layout.batch), jax.device_put(ys[0], layout.batch)

    def consumed(tree):
        leaves = [a for a in jax.tree.leaves(tree) if isinstance(a, jax.Array)]
        return bool(leaves) and all(a.is_deleted() for a in leaves)

    old_params, old_state = params, opt_state
    with jax.set_mesh(mesh):
        params, opt_state, loss = ex.make_train_step(graphdef, tx, layout)(params, opt_state, x, y)
    assert np.isfinite(float(loss))
    assert consumed(old_params) and consumed(old_state), "the sharded step did not donate"
    assert not x.is_deleted() and not consumed(params0)
    same = lambda tree, sh: jax.tree.all(jax.tree.map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), tree, sh))
    assert same(params, layout.params) and same(opt_state, layout.state), "layout changed"

    ref, ref_state = params0, tx.init(params0)
    ref2, ref_state2, _ = ex.make_reference_step(graphdef, tx)(ref, ref_state, xs[0], ys[0])
    assert consumed(ref) and consumed(ref_state), "the reference step did not donate"
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref2)))
    assert err < 1e-5, err
    print("DONATED OK")
""")


def test_sharded_train_step_donates_params_and_state():
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_NUMPY_DTYPE_PROMOTION="strict",
               JAX_NUMPY_RANK_PROMOTION="raise",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([ROOT, EXAMPLES, env.get("PYTHONPATH", "")])
               .rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-W", "error", "-c", SHARDED_CHECK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DONATED OK" in proc.stdout, out[-4000:]
