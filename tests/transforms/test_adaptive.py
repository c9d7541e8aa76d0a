"""Tests of Adagrad, RMSprop (plain, centred) and Adadelta: closed forms, torch parity, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.transforms.adaptive import (ScaleByStddevState, scale_by_adadelta, scale_by_rms,
                                        scale_by_rss, scale_by_stddev)

RNG = np.random.default_rng(7)
SHAPE = (3, 4)
GRADS = [RNG.normal(size=SHAPE) * RNG.choice([0.01, 1.0, 20.0]) for _ in range(35)]
GRADS[2][0, 0] = 0.0
GRADS[0][1, 1] = 0.0


def run(tx, grads, params=None, jit=True):
    params = jnp.zeros(np.shape(grads[0]), jnp.float32) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state)
        outs.append(np.asarray(u, np.float64))
    return outs, state


def ref_rss(grads, s0=0.0, eps=1e-10, in_sqrt=False):
    s, outs = np.full_like(grads[0], s0), []
    for g in grads:
        s = s + np.abs(g) ** 2
        outs.append(g / (np.sqrt(s + eps) if in_sqrt else np.sqrt(s) + eps))
    return outs


def ref_rms(grads, a=0.99, eps=1e-8, v0=0.0, in_sqrt=False, centered=False):
    v, m, outs = np.full_like(grads[0], v0), np.zeros_like(grads[0]), []
    for g in grads:
        v = a * v + (1 - a) * np.abs(g) ** 2
        m = a * m + (1 - a) * g
        var = np.maximum(v - np.abs(m) ** 2, 0.0) if centered else v
        outs.append(g / (np.sqrt(var + eps) if in_sqrt else np.sqrt(var) + eps))
    return outs


def ref_adadelta(grads, rho=0.9, eps=1e-6):
    v, x, outs = np.zeros_like(grads[0]), np.zeros_like(grads[0]), []
    for g in grads:
        v = rho * v + (1 - rho) * np.abs(g) ** 2
        d = np.sqrt(x + eps) / np.sqrt(v + eps) * g
        x = rho * x + (1 - rho) * np.abs(d) ** 2
        outs.append(d)
    return outs


CLOSED = [
    (scale_by_rss(), ref_rss, {}),
    (scale_by_rss(0.1, 1e-7, eps_in_sqrt=True), ref_rss, dict(s0=0.1, eps=1e-7, in_sqrt=True)),
    (scale_by_rss(initial_accumulator_value=2.0, eps=1e-3), ref_rss, dict(s0=2.0, eps=1e-3)),
    (scale_by_rms(), ref_rms, {}),
    (scale_by_rms(0.9, eps_in_sqrt=True, initial_scale=1.0), ref_rms,
     dict(a=0.9, in_sqrt=True, v0=1.0)),
    (scale_by_stddev(), ref_rms, dict(centered=True)),
    (scale_by_stddev(0.5, 1e-4, initial_scale=0.5, eps_in_sqrt=True), ref_rms,
     dict(a=0.5, eps=1e-4, v0=0.5, in_sqrt=True, centered=True)),
    (scale_by_adadelta(), ref_adadelta, {}),
    (scale_by_adadelta(rho=0.5, eps=1e-3), ref_adadelta, dict(rho=0.5, eps=1e-3)),
]


@pytest.mark.parametrize("tx,ref,kwargs", CLOSED, ids=lambda x: repr(x)[:60])
def test_closed_form(tx, ref, kwargs):
    outs, _ = run(tx, GRADS[:10])
    for t, (got, want) in enumerate(zip(outs, ref(GRADS[:10], **kwargs)), start=1):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")


def test_stddev_clamps_negative_variance_from_rounding():
    # v - ḡ² < 0 cannot happen exactly; force it through the state. decay=1 keeps the state.
    tx = scale_by_stddev(decay=1.0, eps=1e-3)
    state = ScaleByStddevState(mu=jnp.ones(2), nu=jnp.full(2, 0.5))
    u, _ = tx.update(jnp.array([2.0, -1.0]), state)
    np.testing.assert_allclose(np.asarray(u), [2.0e3, -1.0e3], rtol=1e-6)  # g / eps, not NaN
    tx = scale_by_stddev(decay=1.0, eps=1e-4, eps_in_sqrt=True)
    u, _ = tx.update(jnp.array([2.0, -1.0]), state)
    np.testing.assert_allclose(np.asarray(u), [2.0e2, -1.0e2], rtol=1e-5)


# ------------------------------------------------------------------ torch parity

TORCH = [
    ("Adagrad", dict(lr=0.1), scale_by_rss()),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5, eps=1e-3),
     scale_by_rss(initial_accumulator_value=0.5, eps=1e-3)),
    ("RMSprop", dict(lr=0.01), scale_by_rms()),
    ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-4), scale_by_rms(decay=0.9, eps=1e-4)),
    ("RMSprop", dict(lr=0.01, centered=True), scale_by_stddev()),
    ("RMSprop", dict(lr=0.01, alpha=0.8, eps=1e-3, centered=True),
     scale_by_stddev(decay=0.8, eps=1e-3)),
    ("Adadelta", dict(lr=1.0), scale_by_adadelta()),
    ("Adadelta", dict(lr=0.5, rho=0.5, eps=1e-4), scale_by_adadelta(rho=0.5, eps=1e-4)),
]


@pytest.mark.parametrize("name,kwargs,tx", TORCH, ids=lambda x: repr(x)[:50])
def test_torch_parity(name, kwargs, tx):
    torch = pytest.importorskip("torch")
    p0 = RNG.normal(size=SHAPE)
    tp = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = getattr(torch.optim, name)([tp], **kwargs)
    full = gradtx.chain(tx, gradtx.scale_by_learning_rate(kwargs["lr"]))
    params = jnp.asarray(p0, jnp.float32)
    state = full.init(params)
    update = jax.jit(full.update)
    for g in GRADS:
        tp.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        params = gradtx.apply_updates(params, u)
    want = tp.detach().numpy().astype(np.float64)
    assert not np.allclose(want, p0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(params, np.float64), want, rtol=1e-5, atol=1e-6)


def test_optax_parity_with_optax_conventions():
    optax = pytest.importorskip("optax")
    pairs = [(optax.scale_by_rss(), scale_by_rss(0.1, 1e-7, eps_in_sqrt=True)),
             (optax.scale_by_rms(), scale_by_rms(0.9, eps_in_sqrt=True)),
             (optax.scale_by_stddev(), scale_by_stddev(0.9, eps_in_sqrt=True)),
             (optax.scale_by_adadelta(), scale_by_adadelta())]
    for otx, tx in pairs:
        params = jnp.zeros(SHAPE, jnp.float32)
        ostate, state = otx.init(params), tx.init(params)
        for g in GRADS[:10]:
            g = jnp.asarray(g, jnp.float32)
            with jax.numpy_dtype_promotion("standard"):
                want, ostate = otx.update(g, ostate)
            got, state = tx.update(g, state)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6,
                                       err_msg=repr(tx))


# ------------------------------------------------------------------ dtypes, complex, structure

@pytest.mark.parametrize("tx,fields", [
    (scale_by_rss(nu_dtype="float32"), ("sum_of_squares",)),
    (scale_by_rms(nu_dtype="float32"), ("nu",)),
    (scale_by_stddev(mu_dtype="float32", nu_dtype="float32"), ("mu", "nu")),
    (scale_by_adadelta(nu_dtype="float32"), ("e_g", "e_x")),
], ids=lambda x: getattr(x, "name", ""))
def test_bf16_params_keep_dtypes(tx, fields):
    params = jnp.zeros(SHAPE, jnp.bfloat16)
    state = tx.init(params)
    for g in GRADS[:3]:
        u, state = jax.jit(tx.update)(jnp.asarray(g, jnp.bfloat16), state)
        assert u.dtype == jnp.bfloat16
        assert all(getattr(state, f).dtype == jnp.float32 for f in fields)
    default = type(tx)()
    u, state = default.update(jnp.ones(SHAPE, jnp.bfloat16), default.init(params))
    assert u.dtype == jnp.bfloat16
    assert all(getattr(state, f).dtype == jnp.bfloat16 for f in fields)


@pytest.mark.parametrize("tx,ref,kwargs", [
    (scale_by_rss(), ref_rss, {}), (scale_by_rms(), ref_rms, {}),
    (scale_by_stddev(), ref_rms, dict(centered=True)), (scale_by_adadelta(), ref_adadelta, {}),
], ids=lambda x: getattr(x, "name", ""))
def test_complex_gradients(tx, ref, kwargs):
    g = [np.array([1 + 2j, -0.5j, 3.0]), np.array([3 - 1j, 2 + 0j, -1j])]
    params = jnp.zeros(3, jnp.complex64)
    state = tx.init(params)
    outs = []
    for gi in g:
        u, state = tx.update(jnp.asarray(gi, jnp.complex64), state)
        assert u.dtype == jnp.complex64
        outs.append(np.asarray(u))
    for leaf in jax.tree.leaves(state):
        if leaf.dtype != jnp.complex64:
            assert leaf.dtype == jnp.float32  # second moments are real
    for got, want in zip(outs, ref(g, **kwargs)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("tx", [scale_by_rss(), scale_by_rms(), scale_by_stddev(),
                                scale_by_adadelta()], ids=repr)
def test_tree_mismatch_raises(tx):
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(gradtx.TreeMismatchError, match=tx.name):
        tx.update({"a": jnp.zeros(2), "c": jnp.zeros(3)}, state)
    with pytest.raises(gradtx.TreeMismatchError, match=tx.name):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros((3, 1))}, state)


@pytest.mark.parametrize("tx", [scale_by_rss(), scale_by_rms(), scale_by_stddev(),
                                scale_by_adadelta()], ids=repr)
def test_jit_equals_eager_and_zero_gradients_are_finite(tx):
    eager, _ = run(tx, GRADS[:5], jit=False)
    jitted, _ = run(tx, GRADS[:5], jit=True)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    zeros, _ = run(tx, [np.zeros(SHAPE)] * 3)
    assert all(np.all(z == 0.0) for z in zeros)


def test_abstract_init_and_flax_like_leaves():
    params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float16)}
    shapes = jax.eval_shape(scale_by_stddev(nu_dtype="float32").init, params)
    assert shapes.mu["w"].dtype == jnp.float16 and shapes.nu["w"].dtype == jnp.float32


def test_initial_values_fill_the_state():
    s = scale_by_rss(initial_accumulator_value=0.25).init(jnp.zeros(3))
    assert s.sum_of_squares.tolist() == [0.25] * 3
    s = scale_by_rms(initial_scale=2.0).init(jnp.zeros(2))
    assert s.nu.tolist() == [2.0, 2.0]


BAD = [
    (scale_by_rss, "initial_accumulator_value", -0.1), (scale_by_rss, "eps", 0.0),
    (scale_by_rss, "nu_dtype", "int32"),
    (scale_by_rms, "decay", 1.5), (scale_by_rms, "decay", -0.1), (scale_by_rms, "eps", 0.0),
    (scale_by_rms, "initial_scale", -1.0), (scale_by_rms, "nu_dtype", "int32"),
    (scale_by_stddev, "decay", 1.01), (scale_by_stddev, "eps", -1e-8),
    (scale_by_stddev, "initial_scale", -1.0), (scale_by_stddev, "mu_dtype", "int8"),
    (scale_by_stddev, "nu_dtype", "bool"),
    (scale_by_adadelta, "rho", 1.1), (scale_by_adadelta, "rho", -0.5),
    (scale_by_adadelta, "eps", 0.0), (scale_by_adadelta, "nu_dtype", "int32"),
]


@pytest.mark.parametrize("cls,arg,value", BAD, ids=lambda x: getattr(x, "__name__", repr(x)))
def test_bad_hyperparameter_names_the_argument(cls, arg, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {arg}="):
        cls(**{arg: value})


@pytest.mark.parametrize("cls,arg", [(scale_by_rss, "eps_in_sqrt"), (scale_by_rms, "eps_in_sqrt"),
                                     (scale_by_stddev, "eps_in_sqrt")])
def test_bad_option_type(cls, arg):
    with pytest.raises(TypeError, match=f"{cls.__name__}: {arg}="):
        cls(**{arg: "yes"})


def test_repr_and_equality():
    assert repr(scale_by_rms(decay=0.9, eps_in_sqrt=True)) == "scale_by_rms(decay=0.9, eps_in_sqrt=True)"
    assert scale_by_rss() == scale_by_rss(0.0, 1e-10)
    assert scale_by_adadelta(nu_dtype=jnp.float32) == scale_by_adadelta(nu_dtype="float32")
