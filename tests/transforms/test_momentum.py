"""Tests of gradtx.trace and gradtx.ema against closed forms, torch.optim.SGD and Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.transforms.momentum import EmaState, TraceState, ema, trace

RNG = np.random.default_rng(0)
GRADS = [RNG.normal(size=(3, 2)) for _ in range(5)]


def run(tx, grads, params=None, jit=False):
    params = jnp.zeros(grads[0].shape, jnp.float32) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state)
        outs.append(np.asarray(u, np.float64))
    return outs, state


def ref_trace(grads, mu, tau=0.0, nesterov=False):
    b, outs = None, []
    for g in grads:
        b = g.copy() if b is None else mu * b + (1 - tau) * g
        outs.append(g + mu * b if nesterov else b.copy())
    return outs


@pytest.mark.parametrize("mu,tau,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.3, False),
                                             (0.7, 0.5, True), (0.0, 0.0, False)])
def test_trace_closed_form(mu, tau, nesterov):
    outs, state = run(trace(decay=mu, dampening=tau, nesterov=nesterov), GRADS)
    for got, want in zip(outs, ref_trace(GRADS, mu, tau, nesterov)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(state.count) == len(GRADS)
    assert isinstance(state, TraceState)


def test_trace_dampening_first_step_is_the_gradient():
    outs, _ = run(trace(decay=0.9, dampening=0.5), GRADS[:1])
    np.testing.assert_allclose(outs[0], GRADS[0], rtol=1e-6)  # not (1 - 0.5) * g


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True),
                                                         (0.8, 0.25, False), (0.5, 0.9, False)])
def test_trace_matches_torch_sgd(momentum, dampening, nesterov):
    torch = pytest.importorskip("torch")
    lr = 0.1
    p0 = RNG.normal(size=(3, 2))
    tp = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = torch.optim.SGD([tp], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    tx = gradtx.chain(trace(decay=momentum, dampening=dampening, nesterov=nesterov),
                      gradtx.scale_by_learning_rate(lr))
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in GRADS:
        tp.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        u, state = step(jnp.asarray(g, jnp.float32), state, params)
        params = gradtx.apply_updates(params, u)
        buf = opt.state[tp]["momentum_buffer"].numpy()
        np.testing.assert_allclose(np.asarray(state[0].trace), buf, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(params), tp.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_trace_tau_zero_matches_optax():
    optax = pytest.importorskip("optax")
    for nesterov in (False, True):
        ours, _ = run(trace(decay=0.8, nesterov=nesterov), GRADS)
        otx = optax.trace(decay=0.8, nesterov=nesterov)
        s = otx.init(jnp.zeros((3, 2), jnp.float32))
        for g, got in zip(GRADS, ours):
            u, s = otx.update(jnp.asarray(g, jnp.float32), s)
            np.testing.assert_allclose(got, np.asarray(u), rtol=1e-6, atol=1e-7)


def momentum_schedule(step):
    return jnp.where(step < 2, 0.5, 0.9)


def test_trace_decay_schedule():
    outs, _ = run(trace(decay=momentum_schedule), GRADS)
    b, want = None, []
    for t, g in enumerate(GRADS):
        mu = 0.5 if t < 2 else 0.9
        b = g.copy() if b is None else mu * b + g
        want.append(b.copy())
    for got, w in zip(outs, want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    # The state structure does not depend on float vs schedule.
    p = jnp.zeros(3)
    assert (jax.tree.structure(trace(0.5).init(p))
            == jax.tree.structure(trace(momentum_schedule).init(p)))


def test_trace_jit_equals_eager():
    tx = trace(decay=0.7, dampening=0.2, nesterov=True)
    eager, _ = run(tx, GRADS)
    jitted, _ = run(tx, GRADS, jit=True)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_trace_dtypes(dtype):
    params = {"w": jnp.zeros((2, 2), dtype)}
    tx = trace(decay=0.9)
    state = tx.init(params)
    assert state.trace["w"].dtype == dtype
    u, state = tx.update({"w": jnp.ones((2, 2), dtype)}, state)
    assert u["w"].dtype == dtype and state.trace["w"].dtype == dtype
    tx32 = trace(decay=0.9, accumulator_dtype="float32")
    state = tx32.init(params)
    assert state.trace["w"].dtype == jnp.float32
    u, state = tx32.update({"w": jnp.ones((2, 2), dtype)}, state)
    assert u["w"].dtype == dtype and state.trace["w"].dtype == jnp.float32


def test_trace_eval_shape_and_tree_mismatch():
    params = {"a": jax.ShapeDtypeStruct((3,), jnp.float32)}
    state = jax.eval_shape(trace().init, params)
    assert state.trace["a"].shape == (3,)
    real = trace().init({"a": jnp.zeros(3)})
    with pytest.raises(gradtx.TreeMismatchError, match="trace"):
        trace().update({"b": jnp.zeros(3)}, real)


def ref_ema(grads, d, debias=True):
    m, outs = 0.0, []
    for t, g in enumerate(grads, start=1):
        m = d * m + (1 - d) * g
        outs.append(m / (1 - d ** t) if debias else m)
    return outs


@pytest.mark.parametrize("d,debias", [(0.9, True), (0.9, False), (0.5, True), (0.0, True)])
def test_ema_closed_form(d, debias):
    outs, state = run(ema(decay=d, debias=debias), GRADS)
    for got, want in zip(outs, ref_ema(GRADS, d, debias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.ema), ref_ema(GRADS, d, False)[-1], rtol=1e-5,
                               atol=1e-6)
    assert isinstance(state, EmaState) and int(state.count) == len(GRADS)


def test_ema_matches_optax():
    optax = pytest.importorskip("optax")
    ours, _ = run(ema(decay=0.8), GRADS)
    otx = optax.ema(decay=0.8, debias=True)
    s = otx.init(jnp.zeros((3, 2), jnp.float32))
    for g, got in zip(GRADS, ours):
        with jax.numpy_dtype_promotion("standard"):  # optax.ema mixes int32 and float32
            u, s = otx.update(jnp.asarray(g, jnp.float32), s)
        np.testing.assert_allclose(got, np.asarray(u), rtol=1e-6, atol=1e-7)


def test_ema_constant_input_debiased_is_exact():
    outs, _ = run(ema(decay=0.99), [np.full((2,), 3.0)] * 3)
    for o in outs:
        np.testing.assert_allclose(o, 3.0, rtol=1e-5)


def test_ema_bf16():
    tx = ema(decay=0.9, accumulator_dtype="float32")
    state = tx.init(jnp.zeros(2, jnp.bfloat16))
    u, state = tx.update(jnp.ones(2, jnp.bfloat16), state)
    assert u.dtype == jnp.bfloat16 and state.ema.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(u, np.float32), 1.0)


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(decay=-0.1), ValueError, "decay"),
    (dict(decay=1.5), ValueError, "decay"),
    (dict(decay="0.9"), TypeError, "decay"),
    (dict(dampening=1.5), ValueError, "dampening"),
    (dict(dampening=-1.0), ValueError, "dampening"),
    (dict(nesterov=1), TypeError, "nesterov"),
    (dict(accumulator_dtype="int32"), ValueError, "accumulator_dtype"),
])
def test_trace_bad_hyperparameters(kwargs, exc, arg):
    with pytest.raises(exc, match=f"trace: {arg}"):
        trace(**kwargs)


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(decay=1.0), ValueError, "decay"),
    (dict(decay=-0.5), ValueError, "decay"),
    (dict(decay=momentum_schedule), TypeError, "decay"),
    (dict(debias="yes"), TypeError, "debias"),
    (dict(accumulator_dtype="bool"), ValueError, "accumulator_dtype"),
])
def test_ema_bad_hyperparameters(kwargs, exc, arg):
    with pytest.raises(exc, match=f"ema: {arg}"):
        ema(**kwargs)


def test_values_and_repr():
    assert trace(0.5) == trace(decay=0.5) and hash(trace(0.5)) == hash(trace(decay=0.5))
    assert repr(trace(decay=0.5, nesterov=True)) == "trace(decay=0.5, nesterov=True)"
    assert repr(ema()) == "ema()"
    assert repr(trace(accumulator_dtype=jnp.float32)) == "trace(accumulator_dtype='float32')"


def test_accepts_extra_kwargs():
    tx = trace()
    u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), None, value=1.0)
    assert u.shape == (2,)


def test_traced_hyperparameters_inside_jit():
    # inject_hyperparams rebuilds transforms with traced values: construction and update must trace.
    @jax.jit
    def run_traced(mu, tau, d, g):
        tx = trace(decay=mu, dampening=tau, nesterov=True)
        s = tx.init(g)
        u, s = tx.update(g, s)
        u, s = tx.update(g, s)
        e = ema(decay=d)
        v, _ = e.update(g, e.init(g))
        return u, v

    u, v = run_traced(jnp.float32(0.5), jnp.float32(0.5), jnp.float32(0.25), jnp.ones(2))
    # b1 = g, b2 = 0.5 + 0.5 = 1, nesterov: g + 0.5 * b2 = 1.5; debiased ema of a constant = 1.
    np.testing.assert_allclose(np.asarray(u), 1.5)
    np.testing.assert_allclose(np.asarray(v), 1.0)


def test_trace_under_lax_cond_and_grad():
    tx = trace(decay=0.5, nesterov=True)
    g = jnp.array([1.0, 2.0])
    state = tx.init(g)

    def step(flag, g, state):
        return jax.lax.cond(flag, lambda: tx.update(g, state), lambda: (g, state))

    u, s = jax.jit(step)(True, g, state)
    np.testing.assert_allclose(np.asarray(u), 1.5 * np.asarray(g))
    assert int(s.count) == 1
    # The update is linear in g: its gradient is (1 + μ) on the first step (b_1 = g).
    dg = jax.grad(lambda x: jnp.sum(tx.update(x, state)[0]))(g)
    np.testing.assert_allclose(np.asarray(dg), 1.5)
