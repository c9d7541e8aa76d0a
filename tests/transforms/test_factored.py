"""Tests of Adafactor's primitives: scale_by_factored_rms and scale_by_param_block_rms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import numerics
from gradtx.transforms.factored import (ScaleByFactoredRmsState, _factored_axes,
                                        scale_by_factored_rms, scale_by_param_block_rms)

RNG = np.random.default_rng(3)
PARAMS_SHAPES = {"w": (6, 8), "t": (3, 8, 6), "b": (5,), "small": (2, 3), "s": ()}


def grads_seq(n, scale=1.0):
    return [{k: RNG.normal(size=s) * scale * RNG.choice([0.1, 1.0, 10.0])
             for k, s in PARAMS_SHAPES.items()} for _ in range(n)]


GRADS = grads_seq(8)


def ref_factored(gs, c=0.8, eps1=1e-30, d=1.0, min_dim=4):
    stats, outs = {}, []
    for t, g in enumerate(gs, start=1):
        beta = 1 - t ** (-c)
        out = {}
        for k, x in g.items():
            axes = _factored_axes(x.shape, True, min_dim)
            sq = x ** 2 + eps1
            if axes is None:
                v = beta * stats.get(k, 0.0) + (1 - beta) * sq
                stats[k] = v
            else:
                i, j = axes
                r0, c0 = stats.get(k, (0.0, 0.0))
                r = beta * r0 + (1 - beta) * sq.mean(axis=j)
                cc = beta * c0 + (1 - beta) * sq.mean(axis=i)
                stats[k] = (r, cc)
                v = (np.expand_dims(r, j) * np.expand_dims(cc, i)
                     / np.expand_dims(r.mean(axis=i, keepdims=True), j))
            u = x / np.sqrt(v)
            if d is not None:
                u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / d)
            out[k] = u
        outs.append(out)
    return outs


def to_jnp(tree, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def zeros(dtype=jnp.float32):
    return {k: jnp.zeros(s, dtype) for k, s in PARAMS_SHAPES.items()}


def run(tx, gs, params=None, jit=True):
    params = zeros() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in gs:
        u, state = update(to_jnp(g), state, params)
        outs.append(jax.tree.map(lambda x: np.asarray(x, np.float64), u))
    return outs, state


@pytest.mark.parametrize("kwargs,ref_kwargs", [
    (dict(min_dim_size_to_factor=4), dict(min_dim=4)),
    (dict(min_dim_size_to_factor=4, clipping_threshold=None, decay_rate=0.5, epsilon=1e-3),
     dict(min_dim=4, d=None, c=0.5, eps1=1e-3)),
    (dict(min_dim_size_to_factor=4, clipping_threshold=0.5), dict(min_dim=4, d=0.5)),
    (dict(), dict(min_dim=128)),  # nothing is large enough to factor
])
def test_closed_form(kwargs, ref_kwargs):
    outs, state = run(scale_by_factored_rms(**kwargs), GRADS)
    for t, (got, want) in enumerate(zip(outs, ref_factored(GRADS, **ref_kwargs)), start=1):
        for k in PARAMS_SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6,
                                       err_msg=f"step {t} leaf {k}")
    assert int(state.count) == len(GRADS)


def test_state_shapes_follow_the_factoring_rule():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4)
    s = tx.init(zeros())
    assert isinstance(s, ScaleByFactoredRmsState)
    shapes = {k: (s.v_row[k].shape, s.v_col[k].shape, s.v[k].shape) for k in PARAMS_SHAPES}
    assert shapes["w"] == ((6,), (8,), ())
    assert shapes["t"] == ((3, 8), (3, 6), ())  # the two largest axes (1, 2); axis 0 is a batch
    assert shapes["b"] == ((), (), (5,))
    assert shapes["small"] == ((), (), (2, 3))
    assert shapes["s"] == ((), (), ())
    assert _factored_axes((5, 2, 5), True, 2) == (0, 2)
    assert _factored_axes((8, 8, 3), True, 2) == (0, 1)
    assert _factored_axes((8, 8), False, 2) is None
    assert _factored_axes((8, 3), True, 4) is None  # the smaller of the two is below the minimum
    unfactored = scale_by_factored_rms(factored=False, min_dim_size_to_factor=4).init(zeros())
    assert unfactored.v["w"].shape == (6, 8)


def test_clipping_bounds_the_update_rms():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4, clipping_threshold=0.25)
    outs, _ = run(tx, GRADS[:3])
    for out in outs:
        for k, u in out.items():
            if u.size:
                assert np.sqrt(np.mean(u ** 2)) <= 0.25 * (1 + 1e-5), k


def test_optax_parity_scale_by_factored_rms_and_adafactor():
    optax = pytest.importorskip("optax")
    params = zeros()
    for clip in (1.0, None):
        ours = scale_by_factored_rms(min_dim_size_to_factor=4, clipping_threshold=clip)
        theirs = optax.scale_by_factored_rms(min_dim_size_to_factor=4)
        if clip is not None:
            theirs = optax.chain(theirs, optax.clip_by_block_rms(clip))
        _compare(optax, ours, theirs, params)
    lr = 0.05
    ours = gradtx.chain(scale_by_factored_rms(min_dim_size_to_factor=4),
                        gradtx.scale_by_learning_rate(lr), scale_by_param_block_rms())
    theirs = optax.adafactor(lr, min_dim_size_to_factor=4)
    _compare(optax, ours, theirs, to_jnp({k: RNG.normal(size=s) for k, s in PARAMS_SHAPES.items()}),
             apply=True)


def _compare(optax, ours, theirs, params, apply=False):
    ostate, state = theirs.init(params), ours.init(params)
    oparams = params
    o_update, update = jax.jit(theirs.update), jax.jit(ours.update)
    for t, g in enumerate(GRADS, start=1):
        g = to_jnp(g)
        with jax.numpy_dtype_promotion("standard"):  # Optax relies on implicit promotion
            want, ostate = o_update(g, ostate, oparams)
        got, state = update(g, state, params)
        for k in PARAMS_SHAPES:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5,
                                       atol=1e-7, err_msg=f"{ours!r} step {t} leaf {k}")
        if apply:
            params = gradtx.apply_updates(params, got)
            oparams = optax.apply_updates(oparams, want)


def test_param_block_rms_closed_form_and_requires_params():
    tx = scale_by_param_block_rms(min_scale=0.01)
    p = {"a": jnp.array([[3.0, -4.0], [0.0, 0.0]]), "z": jnp.zeros(3)}
    u, state = tx.update({"a": jnp.full((2, 2), 2.0), "z": jnp.ones(3)}, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u["a"]), 5.0, rtol=1e-6)  # 2 · RMS = 2 · 2.5
    np.testing.assert_allclose(np.asarray(u["z"]), 0.01, rtol=1e-6)
    assert state == gradtx.EmptyState()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(p, tx.init(p))
    with pytest.raises(gradtx.TreeMismatchError, match="scale_by_param_block_rms"):
        tx.update({"a": jnp.ones((2, 2))}, tx.init(p), p)
    ub, _ = tx.update(jnp.ones(4, jnp.bfloat16), tx.init(None), jnp.full(4, 2.0, jnp.bfloat16))
    assert ub.dtype == jnp.bfloat16 and ub.tolist() == [2.0] * 4


def test_bf16_params_with_float32_statistics():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4, nu_dtype="float32")
    params = zeros(jnp.bfloat16)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in GRADS[:3]:
        u, state = update(to_jnp(g, jnp.bfloat16), state)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
        stats = jax.tree.leaves((state.v_row, state.v_col, state.v))
        assert all(x.dtype == jnp.float32 for x in stats)
    default = scale_by_factored_rms(min_dim_size_to_factor=4)
    _, s = default.update(to_jnp(GRADS[0], jnp.bfloat16), default.init(params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((s.v_row, s.v_col, s.v)))


def test_float16_statistics_that_underflow_stay_finite():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4)  # ε₁ = 1e-30 underflows in float16
    params = {"w": jnp.zeros((4, 4), jnp.float16), "b": jnp.zeros(3, jnp.float16)}
    g = {"w": jnp.zeros((4, 4), jnp.float16).at[0, 0].set(1e-3), "b": jnp.zeros(3, jnp.float16)}
    update = jax.jit(tx.update)
    u, state = update(g, tx.init(params))
    u, state = update(g, state)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))


def test_complex_gradients():
    tx = scale_by_factored_rms(min_dim_size_to_factor=2)
    g = jnp.asarray(RNG.normal(size=(3, 4)) + 1j * RNG.normal(size=(3, 4)), jnp.complex64)
    state = tx.init(jnp.zeros((3, 4), jnp.complex64))
    assert state.v_row.dtype == jnp.float32
    u, _ = tx.update(g, state)
    sq = np.abs(np.asarray(g, np.complex128)) ** 2 + 1e-30
    v = np.outer(sq.mean(1), sq.mean(0)) / sq.mean()
    want = np.asarray(g) / np.sqrt(v)
    want = want / max(1.0, np.sqrt(np.mean(np.abs(want) ** 2)))
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5)


def test_finite_near_int32_max_and_jit_equals_eager():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4)
    state = tx.init(zeros())._replace(count=jnp.asarray(2 ** 31 - 10, jnp.int32))
    update = jax.jit(tx.update)
    for g in GRADS:
        u, state = update(to_jnp(g), state)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))
    for g in grads_seq(6):
        u, state = update(to_jnp(g), state)
    assert int(state.count) == numerics.INT32_MAX
    eager, _ = run(tx, GRADS[:4], jit=False)
    jitted, _ = run(tx, GRADS[:4], jit=True)
    for a, b in zip(eager, jitted):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_tree_and_shape_mismatch_raise():
    tx = scale_by_factored_rms(min_dim_size_to_factor=4)
    state = tx.init({"w": jnp.zeros((8, 8)), "b": jnp.zeros(3)})
    with pytest.raises(gradtx.TreeMismatchError, match="scale_by_factored_rms"):
        tx.update({"w": jnp.zeros((8, 8)), "c": jnp.zeros(3)}, state)
    with pytest.raises(gradtx.TreeMismatchError, match="scale_by_factored_rms.*shape"):
        tx.update({"w": jnp.zeros((8, 4)), "b": jnp.zeros(3)}, state)
    with pytest.raises(gradtx.TreeMismatchError, match="scale_by_factored_rms.*shape"):
        tx.update({"w": jnp.zeros((8, 8)), "b": jnp.zeros(4)}, state)


def test_abstract_init():
    params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)}
    s = jax.eval_shape(scale_by_factored_rms().init, params)
    assert s.v_row["w"].shape == (256,) and s.v_col["w"].shape == (128,)


BAD = [
    (scale_by_factored_rms, "decay_rate", 0.0, ValueError),
    (scale_by_factored_rms, "decay_rate", 1.5, ValueError),
    (scale_by_factored_rms, "epsilon", 0.0, ValueError),
    (scale_by_factored_rms, "clipping_threshold", 0.0, ValueError),
    (scale_by_factored_rms, "clipping_threshold", -1.0, ValueError),
    (scale_by_factored_rms, "min_dim_size_to_factor", 0, ValueError),
    (scale_by_factored_rms, "min_dim_size_to_factor", 1.5, ValueError),
    (scale_by_factored_rms, "min_dim_size_to_factor", True, ValueError),
    (scale_by_factored_rms, "factored", 1, TypeError),
    (scale_by_factored_rms, "nu_dtype", "int32", ValueError),
    (scale_by_param_block_rms, "min_scale", -1e-3, ValueError),
]


@pytest.mark.parametrize("cls,arg,value,exc", BAD, ids=lambda x: getattr(x, "__name__", repr(x)))
def test_bad_hyperparameter_names_the_argument(cls, arg, value, exc):
    with pytest.raises(exc, match=f"{cls.__name__}: {arg}="):
        cls(**{arg: value})


def test_repr_and_equality():
    assert repr(scale_by_factored_rms(clipping_threshold=None)) == \
        "scale_by_factored_rms(clipping_threshold=None)"
    assert scale_by_factored_rms() == scale_by_factored_rms(min_dim_size_to_factor=128)
    assert hash(scale_by_param_block_rms()) == hash(scale_by_param_block_rms(1e-3))
