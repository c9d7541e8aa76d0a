"""Optax parity for the optimizers torch lacks: LAMB, Lion, AdaBelief, Adafactor, LARS, NAdamW.

The same arguments are given to the gradtx alias and to its Optax namesake; both run the same
number of steps on a small non-quadratic loss (so the gradients depend on the trajectory) from the
same initial parameters, and the parameters must agree to float32 rounding at every step. Where
gradtx documents a different default convention (LARS's ratio with weight decay), a test pins the
difference down by reproducing Optax with the adjusted gradtx configuration the docs give, and shows
that the two conventions really differ.

Optax is an oracle only. It is not clean under strict dtype promotion, so its calls run under
``jax.numpy_dtype_promotion("standard")``; gradtx runs strict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

optax = pytest.importorskip("optax")

STEPS = 25
RTOL, ATOL = 2e-5, 1e-5   # parameters are O(1): atol is float32 rounding accumulated over steps


_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((16, 6)).astype(np.float32)
_Y = _RNG.standard_normal((16, 5)).astype(np.float32)
_KERNEL = (0.5 * _RNG.standard_normal((6, 5))).astype(np.float32)
_BIAS = (0.1 * _RNG.standard_normal(5)).astype(np.float32)
_SCALE = (1.0 + 0.1 * _RNG.standard_normal(5)).astype(np.float32)


def _data():
    return jnp.asarray(_X), jnp.asarray(_Y)


def _init_params():
    return {"dense": {"kernel": jnp.asarray(_KERNEL), "bias": jnp.asarray(_BIAS)},
            "scale": jnp.asarray(_SCALE)}


def _loss(params):
    x, y = _data()
    pred = (jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"][None, :])
            * params["scale"][None, :])
    return jnp.mean(jnp.log1p((pred - y) ** 2))   # Cauchy loss: non-quadratic, bounded gradients


def _trajectory(tx, apply, promotion):
    """Parameters after each of STEPS steps (jit once)."""
    with jax.numpy_dtype_promotion(promotion):
        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(_loss)(params), state, params)
            return apply(params, updates), state

        params = _init_params()
        state = tx.init(params)
        out = []
        for _ in range(STEPS):
            params, state = step(params, state)
            out.append(params)
    return out


def _ours(tx):
    return _trajectory(tx, gradtx.apply_updates, "strict")


def _optax(tx):
    return _trajectory(tx, optax.apply_updates, "standard")


def _assert_same_trajectory(ours, theirs, rtol=RTOL, atol=ATOL):
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
            np.testing.assert_allclose(
                x, y, rtol=rtol, atol=atol,
                err_msg=f"step {step + 1}, {jax.tree_util.keystr(path)}")


def _moved(trajectory):
    """Guard against vacuous parity: the parameters must actually move."""
    start, end = _init_params(), trajectory[-1]
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(start), jax.tree.leaves(end)))


CASES = {
    "lamb": [
        dict(learning_rate=0.01),
        dict(learning_rate=0.02, b1=0.8, b2=0.99, eps=1e-5, weight_decay=0.01),
        dict(learning_rate=0.01, eps_root=1e-8, weight_decay=0.1),
    ],
    "lion": [
        dict(learning_rate=1e-3),
        dict(learning_rate=3e-3, b1=0.95, b2=0.98, weight_decay=0.1),
        dict(learning_rate=1e-3, weight_decay=0.0),
    ],
    "adabelief": [
        dict(learning_rate=0.01),
        dict(learning_rate=0.03, b1=0.8, b2=0.99, eps=1e-8, eps_root=1e-12),
    ],
    "nadamw": [
        dict(learning_rate=0.01),
        dict(learning_rate=0.03, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05),
        dict(learning_rate=0.01, eps_root=1e-8, weight_decay=0.0),
    ],
}


@pytest.mark.parametrize("name,kwargs", [pytest.param(n, kw, id=f"{n}-{i}")
                                         for n, cases in CASES.items()
                                         for i, kw in enumerate(cases)])
def test_same_arguments_same_trajectory(name, kwargs):
    ours = _ours(getattr(gradtx, name)(**kwargs))
    theirs = _optax(getattr(optax, name)(**kwargs))
    assert _moved(theirs) > 1e-3
    _assert_same_trajectory(ours, theirs)


def test_lion_defaults_match_optax():
    # Same defaults (b1, b2, weight_decay) when only the learning rate is given.
    _assert_same_trajectory(_ours(gradtx.lion(1e-3)), _optax(optax.lion(1e-3)))


def test_lamb_with_schedule_matches_optax():
    def sched(step):
        return 0.02 * jnp.power(jnp.float32(0.9), jnp.asarray(step, jnp.float32))
    _assert_same_trajectory(_ours(gradtx.lamb(sched, weight_decay=0.01)),
                            _optax(optax.lamb(sched, weight_decay=0.01)))


def test_weight_decay_mask_matches_optax():
    mask = {"dense": {"kernel": True, "bias": False}, "scale": False}
    _assert_same_trajectory(_ours(gradtx.nadamw(0.01, weight_decay=0.5, mask=mask)),
                            _optax(optax.nadamw(0.01, weight_decay=0.5, mask=mask)))
    _assert_same_trajectory(_ours(gradtx.lamb(0.01, weight_decay=0.5, mask=mask)),
                            _optax(optax.lamb(0.01, weight_decay=0.5, mask=mask)))


# ---------------------------------------------------------------------------------------------
# LARS


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=0.5),
    dict(learning_rate=1.0, trust_coefficient=0.01, momentum=0.8),
    dict(learning_rate=1.0, trust_coefficient=0.02, eps=1e-3, momentum=0.9, nesterov=True),
], ids=["defaults", "tc-momentum", "eps-nesterov"])
def test_lars_without_weight_decay_matches_optax(kwargs):
    # Without weight decay the paper's LARS ratio and Optax's coincide.
    theirs = _optax(optax.lars(**kwargs))
    assert _moved(theirs) > 1e-4
    _assert_same_trajectory(_ours(gradtx.lars(**kwargs)), theirs)


def test_lars_optax_convention_is_reproduced_by_explicit_chain():
    # Optax's LARS uses ‖g + λp‖ in the ratio (the LAMB form) and momentum after the learning rate;
    # scale_by_trust_ratio's docstring gives this chain for it.
    lr, wd, tc, eps, mom = 1.0, 0.05, 0.02, 1e-4, 0.9
    ours = gradtx.chain(gradtx.add_decoupled_weight_decay(wd),
                        gradtx.scale_by_trust_ratio(trust_coefficient=tc, eps=eps),
                        gradtx.scale_by_learning_rate(lr), gradtx.trace(mom))
    theirs = _optax(optax.lars(lr, weight_decay=wd, trust_coefficient=tc, eps=eps, momentum=mom))
    _assert_same_trajectory(_ours(ours), theirs)


def test_lars_paper_form_differs_from_optax_with_weight_decay():
    # The paper's ratio tc‖p‖/(‖g‖ + λ‖p‖) is not Optax's tc‖p‖/‖g + λp‖: with λ > 0 they differ.
    lr, wd, tc = 1.0, 0.5, 0.02
    paper = gradtx.chain(gradtx.add_decoupled_weight_decay(wd),
                         gradtx.scale_by_trust_ratio(trust_coefficient=tc, form="lars",
                                                     weight_decay=wd),
                         gradtx.trace(0.9), gradtx.scale_by_learning_rate(lr))
    theirs = _optax(optax.lars(lr, weight_decay=wd, trust_coefficient=tc, momentum=0.9))
    ours = _ours(paper)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(ours[-1]), jax.tree.leaves(theirs[-1])))
    assert diff > 1e-4
    # The paper's ratio is never larger (‖g + λp‖ <= ‖g‖ + λ‖p‖), so it moves less in total.
    assert _moved(ours) <= _moved(theirs) + 1e-6


# ---------------------------------------------------------------------------------------------
# Adafactor (the (6, 5) kernel is factored when min_dim_size_to_factor <= 5)


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=0.01, min_dim_size_to_factor=4),
    dict(learning_rate=0.02, min_dim_size_to_factor=4, decay_rate=0.7, clipping_threshold=0.5,
         multiply_by_parameter_scale=False),
    dict(learning_rate=0.01, min_dim_size_to_factor=128, eps=1e-20),           # unfactored
    dict(learning_rate=0.01, min_dim_size_to_factor=4, factored=False, clipping_threshold=None),
    dict(learning_rate=0.01, min_dim_size_to_factor=4, momentum=0.9),
], ids=["factored", "options", "unfactored", "no-factor-no-clip", "momentum"])
def test_adafactor_same_arguments_same_trajectory(kwargs):
    theirs = _optax(optax.adafactor(**kwargs))
    assert _moved(theirs) > 1e-3
    _assert_same_trajectory(_ours(gradtx.adafactor(**kwargs)), theirs)


def test_adafactor_documented_differences_reproduce_optax():
    # Optax's learning_rate=None applies no step size at all: gradtx's learning_rate=1.0.
    theirs = _optax(optax.adafactor(None, min_dim_size_to_factor=4))
    # (Unit steps on this loss amplify float32 rounding along the trajectory: compare the first
    # steps, where rounding has not been amplified yet.)
    _assert_same_trajectory(_ours(gradtx.adafactor(1.0, min_dim_size_to_factor=4))[:4], theirs[:4])
    # gradtx's default learning_rate=None is the paper's relative step (1e-2 early on): different.
    relative = _ours(gradtx.adafactor(min_dim_size_to_factor=4))
    assert _moved(relative) < 0.1 * _moved(theirs)
    # Optax's decay is not scaled by the learning rate: weight_decay_rate=λ is weight_decay=λ/γ.
    lr, wd = 0.02, 0.01
    theirs = _optax(optax.adafactor(lr, min_dim_size_to_factor=4, weight_decay_rate=wd))
    _assert_same_trajectory(
        _ours(gradtx.adafactor(lr, min_dim_size_to_factor=4, weight_decay=wd / lr)), theirs)
