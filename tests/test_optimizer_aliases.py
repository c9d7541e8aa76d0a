"""The optimizer aliases (gradtx/optimizers.py): their chains, weight-decay conventions, validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import schedules


# ------------------------------------------------------------------------------------------------
# Each alias is the chain its docstring names, by value, including the omitted members.

def _wd(rate, mask=None):
    return gradtx.add_decoupled_weight_decay(rate, mask=mask)


def _lr(rate):
    return gradtx.scale_by_learning_rate(rate)


MASK = {"w": True, "b": False}

CHAINS = [
    (lambda: gradtx.sgd(0.1), [_lr(0.1)]),
    (lambda: gradtx.sgd(0.1, momentum=None), [_lr(0.1)]),
    (lambda: gradtx.sgd(0.1, momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.01,
                        mask=MASK),
     [_wd(0.01, MASK), gradtx.trace(decay=0.9, nesterov=True), _lr(0.1)]),
    (lambda: gradtx.sgd(0.1, momentum=0.5, dampening=0.25),
     [gradtx.trace(decay=0.5, dampening=0.25), _lr(0.1)]),
    (lambda: gradtx.sign_sgd(0.1, weight_decay=0.2, decay_peak_lr=0.1),
     [gradtx.scale_by_sign(), _wd(0.2 / 0.1), _lr(0.1)]),
    (lambda: gradtx.lion(0.1), [gradtx.scale_by_lion(), _wd(1e-3), _lr(0.1)]),
    (lambda: gradtx.lion(0.1, b1=0.8, b2=0.9, weight_decay=0.0, mu_dtype="bfloat16"),
     [gradtx.scale_by_lion(b1=0.8, b2=0.9, mu_dtype="bfloat16"), _lr(0.1)]),
    (lambda: gradtx.adagrad(0.1, 0.1, 1e-7, eps_in_sqrt=True, weight_decay=0.5),
     [_wd(0.5), gradtx.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True),
      _lr(0.1)]),
    (lambda: gradtx.rmsprop(0.1),
     [gradtx.scale_by_rms(decay=0.9, eps=1e-8, eps_in_sqrt=True), _lr(0.1)]),
    (lambda: gradtx.rmsprop(0.1, decay=0.99, eps=1e-6, eps_in_sqrt=False, centered=True,
                            momentum=0.9, nesterov=True, weight_decay=0.1),
     [_wd(0.1), gradtx.scale_by_stddev(decay=0.99, eps=1e-6),
      gradtx.trace(decay=0.9, nesterov=True), _lr(0.1)]),
    (lambda: gradtx.adadelta(), [gradtx.scale_by_adadelta(), _lr(1.0)]),
    (lambda: gradtx.adam(0.1, weight_decay=0.1, mask=MASK, nu_dtype="float32"),
     [_wd(0.1, MASK), gradtx.scale_by_adam(nu_dtype="float32"), _lr(0.1)]),
    (lambda: gradtx.adam(0.1, nesterov=True), gradtx.nadam(0.1).transforms),
    (lambda: gradtx.amsgrad(0.1, b1=0.8, weight_decay=0.1),
     [_wd(0.1), gradtx.scale_by_adam(b1=0.8, amsgrad=True), _lr(0.1)]),
    (lambda: gradtx.nadam(0.1, momentum_decay=4e-3),
     [gradtx.scale_by_adam(nesterov=True, momentum_decay=4e-3), _lr(0.1)]),
    (lambda: gradtx.adamw(0.1), [gradtx.scale_by_adam(), _wd(1e-4), _lr(0.1)]),
    (lambda: gradtx.adamw(0.1, weight_decay=0.0), [gradtx.scale_by_adam(), _lr(0.1)]),
    (lambda: gradtx.nadamw(0.1, weight_decay=0.1, mask=MASK),
     [gradtx.scale_by_adam(nesterov=True), _wd(0.1, MASK), _lr(0.1)]),
    (lambda: gradtx.adamax(0.1, weight_decay=0.1),
     [_wd(0.1), gradtx.scale_by_adamax(), _lr(0.1)]),
    (lambda: gradtx.radam(0.1, threshold=6.0, weight_decay=0.1),
     [_wd(0.1), gradtx.scale_by_radam(threshold=6.0), _lr(0.1)]),
    (lambda: gradtx.adabelief(0.1, weight_decay=0.1),
     [gradtx.scale_by_belief(), _wd(0.1), _lr(0.1)]),
    (lambda: gradtx.lamb(0.1, weight_decay=0.1),
     [gradtx.scale_by_adam(eps=1e-6), _wd(0.1), gradtx.scale_by_trust_ratio(), _lr(0.1)]),
    (lambda: gradtx.lars(0.1),
     [gradtx.scale_by_trust_ratio(trust_coefficient=0.001, form="lars"), gradtx.trace(0.9),
      _lr(0.1)]),
    (lambda: gradtx.lars(0.1, weight_decay=0.1, momentum=0.0),
     [_wd(0.1), gradtx.scale_by_trust_ratio(trust_coefficient=0.001, form="lars",
                                            weight_decay=0.1), _lr(0.1)]),
    (lambda: gradtx.lars(0.1, weight_decay=0.1, mask=MASK),
     [gradtx.masked(gradtx.chain(_wd(0.1), gradtx.scale_by_trust_ratio(
         trust_coefficient=0.001, form="lars", weight_decay=0.1)), MASK),
      gradtx.trace(0.9), _lr(0.1)]),
    (lambda: gradtx.adafactor(0.1, momentum=0.9, weight_decay=0.1),
     [gradtx.scale_by_factored_rms(), gradtx.scale_by_param_block_rms(),
      gradtx.ema(decay=0.9, debias=False, accumulator_dtype="float32"), _wd(0.1), _lr(0.1)]),
    (lambda: gradtx.adafactor(clipping_threshold=None, multiply_by_parameter_scale=False),
     [gradtx.scale_by_factored_rms(clipping_threshold=None),
      _lr(schedules.inverse_sqrt(1e-2, warmup_steps=9999, timescale=1e4, init_value=1e-2))]),
]


@pytest.mark.parametrize("build, members", CHAINS)
def test_alias_is_its_documented_chain(build, members):
    tx = build()
    assert isinstance(tx, gradtx.chain)
    assert tx == gradtx.chain(*members)
    assert hash(tx) == hash(build())        # a value: equal optimizers hit the same jit cache


def test_a_schedule_is_never_omitted():
    def decay(step):
        return jnp.zeros((), jnp.float32) * step
    assert gradtx.adamw(0.1, weight_decay=decay).transforms[1] == _wd(decay)
    assert gradtx.sgd(0.1, momentum=decay).transforms[0] == gradtx.trace(decay)


def test_omitted_decay_changes_the_state_structure_as_documented():
    params = {"w": jnp.ones(3)}
    with_decay = jax.tree.structure(gradtx.adamw(0.1).init(params))
    without = jax.tree.structure(gradtx.adamw(0.1, weight_decay=0.0).init(params))
    assert with_decay != without


def test_adafactor_default_learning_rate_is_the_relative_step():
    schedule = gradtx.adafactor().transforms[-1].learning_rate
    steps = np.array([0, 1, 99, 9998, 9999, 10000, 39999, 10 ** 6])
    expected = np.minimum(1e-2, 1.0 / np.sqrt(steps + 1.0))   # t = count + 1
    np.testing.assert_allclose([float(schedule(int(s))) for s in steps], expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Weight-decay conventions, checked numerically: torch/Optax p ← p − α·η_t(u + λp) and the AdamW
# paper's p ← p − η_t(α·u + λp) (decay_peak_lr=α), with learning_rate = α·η_t.

@dataclasses.dataclass(frozen=True)
class PeakTimesDecay:
    """``peak · 0.5**t``: a schedule whose peak (at t = 0) is ``peak``."""

    peak: float

    def __call__(self, step):
        t = jnp.asarray(step, jnp.float32)
        return jnp.float32(self.peak) * jnp.power(jnp.float32(0.5), t)


DIRECTIONS = {
    "adamw": (gradtx.adamw, gradtx.scale_by_adam()),
    "nadamw": (gradtx.nadamw, gradtx.scale_by_adam(nesterov=True)),
    "adabelief": (gradtx.adabelief, gradtx.scale_by_belief()),
    "lion": (gradtx.lion, gradtx.scale_by_lion()),
    "sign_sgd": (gradtx.sign_sgd, gradtx.scale_by_sign()),
    "adafactor": (lambda lr, **kw: gradtx.adafactor(lr, multiply_by_parameter_scale=False, **kw),
                  gradtx.scale_by_factored_rms()),
}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_decay_conventions(name):
    alias, direction = DIRECTIONS[name]
    alpha, lam, steps = 0.25, 0.5, 4
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=5).astype(np.float32)
    grads = rng.normal(size=(steps, 5)).astype(np.float32)

    # The parameter-independent directions u_t, from the primitive alone.
    state = direction.init(jnp.asarray(p0))
    dirs = []
    for g in grads:
        u, state = direction.update(jnp.asarray(g), state, jnp.asarray(p0))
        dirs.append(np.asarray(u, np.float64))

    def run(tx):
        p = jnp.asarray(p0)
        s = tx.init(p)
        for g in grads:
            u, s = tx.update(jnp.asarray(g), s, p)
            p = gradtx.apply_updates(p, u)
        return np.asarray(p, np.float64)

    torch_style, paper = p0.astype(np.float64), p0.astype(np.float64)
    for t, u in enumerate(dirs):
        eta = 0.5 ** t
        torch_style = torch_style - alpha * eta * (u + lam * torch_style)
        paper = paper - eta * (alpha * u + lam * paper)

    lr = PeakTimesDecay(alpha)
    np.testing.assert_allclose(run(alias(lr, weight_decay=lam)), torch_style, rtol=1e-5)
    np.testing.assert_allclose(run(alias(lr, weight_decay=lam, decay_peak_lr=alpha)), paper,
                               rtol=1e-5)
    assert np.max(np.abs(torch_style - paper)) > 1e-2      # the two conventions differ


def test_coupled_decay_goes_through_the_moments():
    # adam(weight_decay=λ) is Adam on g + λp (L2); adamw is not.
    p = jnp.array([2.0, -1.0])
    g = jnp.array([0.5, 0.5])
    tx = gradtx.adam(0.1, weight_decay=0.5)
    coupled, _ = tx.update(g, tx.init(p), p)
    plain = gradtx.adam(0.1)
    expected, _ = plain.update(g + 0.5 * p, plain.init(p), p)
    np.testing.assert_allclose(coupled, expected, rtol=1e-6)


def test_mask_selects_the_decayed_parameters():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for build in (gradtx.sgd, gradtx.adamw, gradtx.lion, gradtx.sign_sgd):
        tx = build(0.5, weight_decay=0.5, mask=MASK)
        u, _ = tx.update(zeros, tx.init(params), params)
        assert u["b"].tolist() == [0.0, 0.0], build
        assert all(x < 0 for x in u["w"].tolist()), build


def test_lars_mask_gives_excluded_parameters_plain_momentum_sgd():
    params = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([3.0, 4.0])}
    grads = {"w": jnp.array([0.3, 0.4]), "b": jnp.array([0.3, 0.4])}
    tx = gradtx.lars(0.5, weight_decay=0.1, mask=MASK, trust_coefficient=1.0, momentum=0.0)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["b"], [-0.15, -0.2], rtol=1e-6)          # -γ g
    # w: -γ · ‖p‖/(‖g‖ + λ‖p‖) · (g + λp) = -0.5 · 5/1 · [0.6, 0.8]
    np.testing.assert_allclose(u["w"], [-1.5, -2.0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Validation: errors name the alias and its argument.

ALIASES = [gradtx.sgd, gradtx.sign_sgd, gradtx.lion, gradtx.adagrad, gradtx.rmsprop,
           gradtx.adadelta, gradtx.adam, gradtx.amsgrad, gradtx.nadam, gradtx.adamw,
           gradtx.nadamw, gradtx.adamax, gradtx.radam, gradtx.adabelief, gradtx.lamb,
           gradtx.lars, gradtx.adafactor]


@pytest.mark.parametrize("alias", ALIASES, ids=lambda f: f.__name__)
def test_learning_rate_and_weight_decay_are_checked(alias):
    name = alias.__name__
    with pytest.raises(ValueError, match=rf"^{name}: learning_rate=-1.0 is out of range"):
        alias(-1.0)
    with pytest.raises(ValueError, match=rf"^{name}: weight_decay=-0.5 is out of range"):
        alias(0.1, weight_decay=-0.5)
    with pytest.raises(TypeError, match=rf"^{name}: learning_rate='fast'"):
        alias("fast")


@pytest.mark.parametrize("alias", [a for a in ALIASES if a not in (gradtx.adadelta,
                                                                    gradtx.adafactor)],
                         ids=lambda f: f.__name__)
def test_learning_rate_is_required(alias):
    with pytest.raises(TypeError, match="learning_rate"):
        alias()


@pytest.mark.parametrize("call, match", [
    (lambda: gradtx.sgd(0.1, nesterov=True), r"^sgd: nesterov=True needs momentum > 0"),
    (lambda: gradtx.sgd(0.1, momentum=1.5), r"^sgd: momentum=1.5 is out of range"),
    (lambda: gradtx.sgd(0.1, momentum=0.5, dampening=2.0), r"^sgd: dampening=2.0"),
    (lambda: gradtx.adam(0.1, b1=1.0), r"^adam: b1=1.0 is out of range"),
    (lambda: gradtx.adamw(0.1, b2=-0.1), r"^adamw: b2=-0.1 is out of range"),
    (lambda: gradtx.adamw(0.1, eps=-1.0), r"^adamw: eps=-1.0 is out of range"),
    (lambda: gradtx.adamw(0.1, decay_peak_lr=0.0), r"^adamw: decay_peak_lr=0.0 is out of range"),
    (lambda: gradtx.adamw(0.1, weight_decay=PeakTimesDecay(0.1), decay_peak_lr=0.1),
     r"^adamw: decay_peak_lr=0.1 needs a float weight_decay"),
    (lambda: gradtx.nadam(0.1, momentum_decay=-1.0), r"^nadam: momentum_decay=-1.0"),
    (lambda: gradtx.rmsprop(0.1, decay=1.5), r"^rmsprop: decay=1.5 is out of range"),
    (lambda: gradtx.rmsprop(0.1, eps=0.0), r"^rmsprop: eps=0.0 is out of range"),
    (lambda: gradtx.adagrad(0.1, initial_accumulator_value=-1.0),
     r"^adagrad: initial_accumulator_value=-1.0"),
    (lambda: gradtx.adadelta(rho=2.0), r"^adadelta: rho=2.0 is out of range"),
    (lambda: gradtx.radam(0.1, threshold=3.0), r"^radam: threshold=3.0 is out of range"),
    (lambda: gradtx.lion(0.1, b1=1.5), r"^lion: b1=1.5 is out of range"),
    (lambda: gradtx.lars(0.1, trust_coefficient=-1.0), r"^lars: trust_coefficient=-1.0"),
    (lambda: gradtx.adafactor(decay_rate=0.0), r"^adafactor: decay_rate=0.0 is out of range"),
    (lambda: gradtx.adafactor(momentum=1.0), r"^adafactor: momentum=1.0 is out of range"),
    (lambda: gradtx.adafactor(clipping_threshold=0.0), r"^adafactor: clipping_threshold=0.0"),
])
def test_argument_errors_name_the_alias(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_malformed_mask_fails_at_construction_even_without_decay():
    with pytest.raises(TypeError, match="mask"):
        gradtx.adamw(0.1, weight_decay=0.0, mask={"w": "yes"})
