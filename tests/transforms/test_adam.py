"""Tests of the Adam family: closed forms, torch.optim and Optax parity, dtypes, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import numerics
from gradtx.transforms.adam import (ScaleByAdamState, _radam_rho, scale_by_adam, scale_by_adamax,
                                    scale_by_belief, scale_by_radam)

RNG = np.random.default_rng(42)
SHAPE = (3, 4)
GRADS = [RNG.normal(size=SHAPE) * RNG.choice([0.01, 1.0, 30.0]) for _ in range(40)]
GRADS[3][0, 0] = 0.0
GRADS[0][1, 1] = 0.0  # a coordinate whose first gradient is zero


def run(tx, grads, params=None, jit=True):
    params = jnp.zeros(np.shape(grads[0]), jnp.float32) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        outs.append(np.asarray(u, np.float64))
    return outs, state


# ------------------------------------------------------------------ numpy float64 references

def ref_adam(grads, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, amsgrad=False, nesterov=False,
             psi=None):
    m = np.zeros_like(grads[0]); v = np.zeros_like(grads[0]); vmax = np.zeros_like(v)
    prod, outs = 1.0, []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * np.abs(g) ** 2
        vmax = np.maximum(vmax, v)
        vhat = (vmax if amsgrad else v) / (1 - b2 ** t)
        if psi is not None:
            mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
            prod *= mu
            num = (1 - mu) * g / (1 - prod) + mu_next * m / (1 - prod * mu_next)
        elif nesterov:
            num = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        else:
            num = m / (1 - b1 ** t)
        outs.append(num / (np.sqrt(vhat + eps_root) + eps))
    return outs


def ref_adamax(grads, b1=0.9, b2=0.999, eps=1e-8):
    m = np.zeros_like(grads[0]); u = np.zeros_like(m); outs = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + eps)
        outs.append(m / (1 - b1 ** t) / u)
    return outs


def ref_radam(grads, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0):
    m = np.zeros_like(grads[0]); v = np.zeros_like(m); outs = []
    rho_inf = 2 / (1 - b2) - 1
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        mhat = m / (1 - b1 ** t)
        rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        if rho > threshold:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            outs.append(r * mhat * math.sqrt(1 - b2 ** t) / (np.sqrt(v) + eps))
        else:
            outs.append(mhat)
    return outs


def ref_belief(grads, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16):
    m = np.zeros_like(grads[0]); s = np.zeros_like(m); outs = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps_root
        outs.append(m / (1 - b1 ** t) / (np.sqrt(s / (1 - b2 ** t)) + eps))
    return outs


CLOSED_FORMS = [
    (scale_by_adam(), ref_adam, {}),
    (scale_by_adam(b1=0.5, b2=0.9, eps=1e-3, eps_root=1e-4), ref_adam,
     dict(b1=0.5, b2=0.9, eps=1e-3, eps_root=1e-4)),
    (scale_by_adam(amsgrad=True, b2=0.9), ref_adam, dict(amsgrad=True, b2=0.9)),
    (scale_by_adam(nesterov=True), ref_adam, dict(nesterov=True)),
    (scale_by_adam(nesterov=True, momentum_decay=0.004), ref_adam, dict(psi=0.004)),
    (scale_by_adam(nesterov=True, momentum_decay=0.5, amsgrad=True, b2=0.9), ref_adam,
     dict(psi=0.5, amsgrad=True, b2=0.9)),
    (scale_by_adamax(), ref_adamax, {}),
    (scale_by_adamax(b1=0.0, b2=0.5, eps=1e-3), ref_adamax, dict(b1=0.0, b2=0.5, eps=1e-3)),
    (scale_by_radam(), ref_radam, {}),
    (scale_by_radam(b2=0.9, threshold=4.0), ref_radam, dict(b2=0.9, threshold=4.0)),
    (scale_by_belief(), ref_belief, {}),
    (scale_by_belief(b1=0.5, eps=1e-3, eps_root=0.0), ref_belief,
     dict(b1=0.5, eps=1e-3, eps_root=0.0)),
]


@pytest.mark.parametrize("tx,ref,kwargs", CLOSED_FORMS, ids=lambda x: repr(x)[:60])
def test_closed_form(tx, ref, kwargs):
    outs, state = run(tx, GRADS)
    for t, (got, want) in enumerate(zip(outs, ref(GRADS, **kwargs)), start=1):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
    assert int(state.count) == len(GRADS)


def test_radam_switches_on_at_step_six():
    ones = [np.ones(SHAPE)] * 7
    outs, _ = run(scale_by_radam(), ones)
    for t in range(5):
        np.testing.assert_allclose(outs[t], 1.0, rtol=1e-6)  # m̂ = 1: momentum only
    assert not np.allclose(outs[5], 1.0, rtol=1e-3)  # ρ_6 ≈ 5.99 > 5: rectified


def test_radam_rho_is_accurate_in_float32():
    for b2 in (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999):
        ts = np.array([1, 2, 5, 6, 7, 50, 1000, 10**5, 2**31 - 1])
        rho, rho_inf = _radam_rho(b2, jnp.asarray(ts, jnp.int32))
        b2 = float(np.float32(b2))  # hyperparameters enter as their float32 values
        want_inf = 2 / (1 - b2) - 1
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            b2t = np.array([b2 ** float(t) for t in ts])
            want = np.where(b2t > 0, want_inf - 2 * ts * b2t / np.where(b2t < 1, 1 - b2t, 1.0),
                            want_inf)
        np.testing.assert_allclose(np.asarray(rho, np.float64), want, rtol=3e-6, atol=2e-6)
        np.testing.assert_allclose(float(rho_inf), want_inf, rtol=1e-6)
    # A traced b2 takes the same route.
    rho = jax.jit(lambda b: _radam_rho(b, jnp.asarray(6, jnp.int32))[0])(jnp.float32(0.999))
    np.testing.assert_allclose(float(rho), 2 / 0.001 - 1 - 12 * 0.999 ** 6 / (1 - 0.999 ** 6),
                               rtol=1e-5)


def test_complex_gradients_use_abs_squared():
    g = [np.array([1 + 2j, -0.5j]), np.array([3 - 1j, 2 + 0j])]
    tx = scale_by_adam(nesterov=True)
    params = jnp.zeros(2, jnp.complex64)
    state = tx.init(params)
    assert state.mu.dtype == jnp.complex64 and state.nu.dtype == jnp.float32
    outs = []
    for gi in g:
        u, state = tx.update(jnp.asarray(gi, jnp.complex64), state)
        assert u.dtype == jnp.complex64
        outs.append(np.asarray(u))
    for got, want in zip(outs, ref_adam(g, nesterov=True)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for tx in (scale_by_adamax(), scale_by_radam(), scale_by_belief()):
        u, _ = tx.update(jnp.asarray(g[0], jnp.complex64), tx.init(params))
        assert u.dtype == jnp.complex64 and bool(jnp.isfinite(u).all())


# ------------------------------------------------------------------ torch parity

def _torch_run(torch, opt_cls, kwargs, p0, grads):
    tp = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = opt_cls([tp], **kwargs)
    for g in grads:
        tp.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return tp.detach().numpy().astype(np.float64)


def _gradtx_run(tx, p0, grads):
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        params = gradtx.apply_updates(params, u)
    return np.asarray(params, np.float64)


TORCH_CASES = [
    ("Adam", dict(lr=0.01), scale_by_adam()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), scale_by_adam(b1=0.8, b2=0.99, eps=1e-6)),
    ("Adam", dict(lr=0.01, amsgrad=True), scale_by_adam(amsgrad=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, betas=(0.9, 0.9)), scale_by_adam(amsgrad=True, b2=0.9)),
    ("NAdam", dict(lr=0.01), scale_by_adam(nesterov=True, momentum_decay=0.004)),
    ("NAdam", dict(lr=0.01, momentum_decay=0.1, betas=(0.8, 0.99)),
     scale_by_adam(b1=0.8, b2=0.99, nesterov=True, momentum_decay=0.1)),
    ("RAdam", dict(lr=0.01), scale_by_radam()),
    ("RAdam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-4), scale_by_radam(b2=0.99, eps=1e-4)),
    ("Adamax", dict(lr=0.01), scale_by_adamax()),
    ("Adamax", dict(lr=0.01, betas=(0.5, 0.9), eps=1e-3), scale_by_adamax(b1=0.5, b2=0.9, eps=1e-3)),
]


@pytest.mark.parametrize("name,kwargs,tx", TORCH_CASES, ids=lambda x: repr(x)[:50])
def test_torch_parity(name, kwargs, tx):
    torch = pytest.importorskip("torch")
    p0 = RNG.normal(size=SHAPE)
    want = _torch_run(torch, getattr(torch.optim, name), kwargs, p0, GRADS)
    got = _gradtx_run(gradtx.chain(tx, gradtx.scale_by_learning_rate(kwargs["lr"])), p0, GRADS)
    assert not np.allclose(want, p0, atol=1e-3)  # the trajectory moved
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_torch_nadam_differs_from_constant_beta_nadam():
    # The two NAdam forms are different algorithms: guard against silently merging them.
    a, _ = run(scale_by_adam(nesterov=True), GRADS[:5])
    b, _ = run(scale_by_adam(nesterov=True, momentum_decay=0.004), GRADS[:5])
    assert not np.allclose(a[-1], b[-1], rtol=1e-3)


# ------------------------------------------------------------------ optax parity

OPTAX_CASES = [
    ("scale_by_adam", dict(nesterov=True), scale_by_adam(nesterov=True)),
    ("scale_by_adam", dict(b1=0.5, eps_root=1e-8), scale_by_adam(b1=0.5, eps_root=1e-8)),
    ("scale_by_belief", {}, scale_by_belief()),
    ("scale_by_belief", dict(b1=0.8, b2=0.99, eps=1e-8, eps_root=1e-10),
     scale_by_belief(b1=0.8, b2=0.99, eps=1e-8, eps_root=1e-10)),
    ("scale_by_radam", dict(b2=0.9), scale_by_radam(b2=0.9)),
    ("scale_by_adamax", {}, scale_by_adamax()),
]


@pytest.mark.parametrize("name,kwargs,tx", OPTAX_CASES, ids=lambda x: repr(x)[:50])
def test_optax_parity(name, kwargs, tx):
    optax = pytest.importorskip("optax")
    otx = getattr(optax, name)(**kwargs)
    params = jnp.zeros(SHAPE, jnp.float32)
    ostate, state = otx.init(params), tx.init(params)
    for t, g in enumerate(GRADS[:30], start=1):
        g = jnp.asarray(g, jnp.float32)
        with jax.numpy_dtype_promotion("standard"):  # Optax itself relies on implicit promotion
            want, ostate = otx.update(g, ostate)
        got, state = tx.update(g, state)
        # RAdam: Optax adds eps after bias correction (see the docstring); with eps=1e-8 and
        # gradients of order 0.01..30 the difference is far below the tolerance. b2=0.9 keeps
        # Optax's float32 rho_t accurate (see test_optax_radam_rho_is_inaccurate_at_default_b2).
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-7,
                                   err_msg=f"step {t}")


def test_optax_radam_rho_is_inaccurate_at_default_b2():
    """Pinned difference: Optax evaluates ρ_t = ρ∞ - 2tβ₂ᵗ/(1-β₂ᵗ) directly in float32, which
    cancels for β₂ = 0.999 (≈1% error in the update at the first rectified step, 0.1% at step 40).
    gradtx matches the float64 formula (test_closed_form) and torch (test_torch_parity)."""
    optax = pytest.importorskip("optax")
    otx, tx = optax.scale_by_radam(), scale_by_radam()
    params = jnp.zeros(SHAPE, jnp.float32)
    ostate, state = otx.init(params), tx.init(params)
    rel = []
    for g in GRADS[:40]:
        g = jnp.asarray(g, jnp.float32)
        with jax.numpy_dtype_promotion("standard"):
            want, ostate = otx.update(g, ostate)
        got, state = tx.update(g, state)
        rel.append(float(jnp.max(jnp.abs(got - want) / jnp.maximum(jnp.abs(want), 1e-6))))
    # unrectified steps agree to float32 rounding of the hyperparameters (gradtx reads b1, b2 as
    # float32 values; Optax forms 1 - b1 in float64 on the host)
    assert max(rel[:5]) < 1e-5
    assert 1e-3 < rel[5] < 3e-2  # first rectified step: Optax's rounding shows
    assert rel[-1] < 3e-3


# ------------------------------------------------------------------ state, dtypes, numerics

def test_adam_state_structure_is_fixed():
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    plain = scale_by_adam().init(params)
    assert isinstance(plain, ScaleByAdamState)
    assert plain.nu_max == () and plain.mu_product.dtype == jnp.float32
    _, s1 = scale_by_adam().update(jax.tree.map(jnp.ones_like, params), plain)
    assert float(s1.mu_product) == 1.0  # unused without momentum_decay
    ams = scale_by_adam(amsgrad=True).init(params)
    assert jax.tree.structure(ams.nu_max) == jax.tree.structure(params)
    nadam = scale_by_adam(nesterov=True, momentum_decay=0.004)
    s = nadam.init(params)
    assert jax.tree.structure(s) == jax.tree.structure(plain)
    _, s = nadam.update(jax.tree.map(jnp.ones_like, params), s)
    np.testing.assert_allclose(float(s.mu_product), 0.9 * (1 - 0.5 * 0.96 ** 0.004), rtol=1e-6)


def test_abstract_init():
    params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)}
    for tx in (scale_by_adam(amsgrad=True, mu_dtype="float32"), scale_by_adamax(), scale_by_radam(),
               scale_by_belief()):
        shapes = jax.eval_shape(tx.init, params)
        assert shapes.mu["w"].shape == (4, 3)


@pytest.mark.parametrize("tx", [
    scale_by_adam(mu_dtype="float32", nu_dtype="float32", amsgrad=True),
    scale_by_adamax(mu_dtype="float32", nu_dtype="float32"),
    scale_by_radam(mu_dtype="float32", nu_dtype="float32"),
    scale_by_belief(mu_dtype="float32", nu_dtype="float32"),
], ids=lambda tx: tx.name)
def test_bf16_params_with_float32_moments(tx):
    params = jnp.zeros(SHAPE, jnp.bfloat16)
    state = tx.init(params)
    for g in GRADS[:3]:
        u, state = jax.jit(tx.update)(jnp.asarray(g, jnp.bfloat16), state)
        assert u.dtype == jnp.bfloat16
        assert state.mu.dtype == jnp.float32 and state.nu.dtype == jnp.float32
    default = type(tx)()
    s = default.init(params)
    u, s2 = default.update(jnp.ones(SHAPE, jnp.bfloat16), s)
    assert s2.mu.dtype == jnp.bfloat16 and s2.nu.dtype == jnp.bfloat16 and u.dtype == jnp.bfloat16
    # The bf16-state step tracks the float32 one to bf16 accuracy.
    want = run(type(tx)(), [np.ones(SHAPE)])[0][0]
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-2)


def test_bf16_momentum_mu_dtype_only():
    tx = scale_by_adam(mu_dtype="bfloat16")
    params = jnp.zeros(3, jnp.float32)
    _, s = tx.update(jnp.ones(3), tx.init(params))
    assert s.mu.dtype == jnp.bfloat16 and s.nu.dtype == jnp.float32


@pytest.mark.parametrize("tx", [scale_by_adam(), scale_by_adam(nesterov=True),
                                scale_by_adam(nesterov=True, momentum_decay=0.004, amsgrad=True),
                                scale_by_adamax(), scale_by_radam(), scale_by_belief()],
                         ids=repr)
def test_finite_near_int32_max(tx):
    params = jnp.zeros(SHAPE, jnp.float32)
    state = tx.init(params)._replace(count=jnp.asarray(2 ** 31 - 10, jnp.int32))
    update = jax.jit(tx.update)
    for g in GRADS[:15]:
        u, state = update(jnp.asarray(g, jnp.float32), state)
        assert bool(jnp.isfinite(u).all())
    assert int(state.count) == numerics.INT32_MAX


@pytest.mark.parametrize("tx", [scale_by_adam(amsgrad=True), scale_by_adamax(), scale_by_radam(),
                                scale_by_belief(), scale_by_adam(nesterov=True, momentum_decay=0.01)],
                         ids=repr)
def test_jit_equals_eager(tx):
    eager, _ = run(tx, GRADS[:8], jit=False)
    jitted, _ = run(tx, GRADS[:8], jit=True)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tx", [scale_by_adam(amsgrad=True), scale_by_adamax(), scale_by_radam(),
                                scale_by_belief()], ids=repr)
def test_tree_mismatch_raises(tx):
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(gradtx.TreeMismatchError, match=tx.name):
        tx.update({"a": jnp.zeros(2), "c": jnp.zeros(3)}, state)
    with pytest.raises(gradtx.TreeMismatchError, match=tx.name):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(4)}, state)


def test_zero_gradients_give_zero_updates():
    for tx in (scale_by_adam(), scale_by_adam(eps=0.0, eps_root=1e-12), scale_by_adamax(),
               scale_by_radam(), scale_by_belief()):
        outs, _ = run(tx, [np.zeros(SHAPE)] * 8)
        assert all(np.all(o == 0.0) for o in outs), tx


def test_extra_arguments_are_ignored():
    tx = scale_by_adam()
    u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), None, value=1.0)
    assert u.shape == (2,)


def test_repr_reads_like_the_call():
    assert repr(scale_by_adam(b1=0.8, nesterov=True)) == "scale_by_adam(b1=0.8, nesterov=True)"
    assert scale_by_adam(b1=0.8) == scale_by_adam(b1=0.8)
    assert hash(scale_by_radam()) == hash(scale_by_radam())


# ------------------------------------------------------------------ validation

BAD = [
    (scale_by_adam, "b1", 1.0), (scale_by_adam, "b1", -0.1), (scale_by_adam, "b2", 1.0),
    (scale_by_adam, "b2", -1.0), (scale_by_adam, "eps", -1e-8), (scale_by_adam, "eps_root", -1.0),
    (scale_by_adam, "momentum_decay", 0.0), (scale_by_adam, "momentum_decay", -0.004),
    (scale_by_adam, "mu_dtype", "int32"), (scale_by_adam, "nu_dtype", "int8"),
    (scale_by_adamax, "b1", 1.0), (scale_by_adamax, "b2", 1.5), (scale_by_adamax, "eps", 0.0),
    (scale_by_adamax, "mu_dtype", "int32"), (scale_by_adamax, "nu_dtype", "bool"),
    (scale_by_radam, "b1", 1.5), (scale_by_radam, "b2", 1.0), (scale_by_radam, "eps", 0.0),
    (scale_by_radam, "threshold", 3.0), (scale_by_radam, "mu_dtype", "int32"),
    (scale_by_radam, "nu_dtype", "int32"),
    (scale_by_belief, "b1", 1.0), (scale_by_belief, "b2", 2.0), (scale_by_belief, "eps", -1.0),
    (scale_by_belief, "eps_root", -1.0), (scale_by_belief, "mu_dtype", "int32"),
    (scale_by_belief, "nu_dtype", "int32"),
]


@pytest.mark.parametrize("cls,arg,value", BAD, ids=lambda x: getattr(x, "__name__", repr(x)))
def test_bad_hyperparameter_names_the_argument(cls, arg, value):
    kwargs = {arg: value}
    if arg == "momentum_decay":
        kwargs["nesterov"] = True
    with pytest.raises(ValueError, match=f"{cls.__name__}: {arg}="):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [scale_by_adam, scale_by_belief])
def test_eps_and_eps_root_both_zero_rejected(cls):
    with pytest.raises(ValueError, match="eps=0.0 and eps_root=0.0"):
        cls(eps=0.0, eps_root=0.0)


def test_momentum_decay_needs_nesterov():
    with pytest.raises(ValueError, match="momentum_decay=0.004 needs nesterov=True"):
        scale_by_adam(momentum_decay=0.004)


@pytest.mark.parametrize("value", [True, "0.9", None])
def test_non_numeric_betas_raise_type_error(value):
    with pytest.raises(TypeError, match="scale_by_adam: b1="):
        scale_by_adam(b1=value)
    with pytest.raises(TypeError, match="scale_by_adam: amsgrad="):
        scale_by_adam(amsgrad=1)


# Moments stored in bfloat16 are read back as stored (numerics.as_stored); float16 ones unrounded.

def _adam_direction(m, v, count, eps=1e-8):
    bc1, bc2 = 1 - 0.9 ** count, 1 - 0.999 ** count
    m, v = np.asarray(m, np.float32), np.asarray(v, np.float32)
    return (m / np.float32(bc1)) / (np.sqrt(v * np.float32(1 / bc2)) + np.float32(eps))


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_adam_reads_bfloat16_moments_as_stored_and_float16_ones_unrounded(state_dtype):
    tx = scale_by_adam(mu_dtype=state_dtype, nu_dtype=state_dtype)
    state = tx.init(jnp.zeros(SHAPE, jnp.float32))
    for i, g in enumerate(GRADS[:6]):
        g = jnp.asarray(g, jnp.float32)
        m_old, v_old = (np.asarray(x, np.float32) for x in (state.mu, state.nu))
        gn = np.asarray(g)
        m_exact = np.float32(0.9) * m_old + np.float32(0.1) * gn          # unrounded new moments
        v_exact = np.float32(0.999) * v_old + np.float32(0.001) * gn * gn
        u, state = tx.update(g, state)
        from_stored = _adam_direction(state.mu, state.nu, i + 1)
        from_exact = _adam_direction(m_exact, v_exact, i + 1)
        assert np.abs(from_stored - from_exact).max() > 1e-4 * np.abs(from_exact).max()  # differ
        want = from_stored if state_dtype == "bfloat16" else from_exact
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=0)
