"""The classic optimizers, each a short chain of public primitives.

Every alias here returns a plain :class:`gradtx.chain` of public transforms, so an optimizer can be
read as its chain and rebuilt (or modified) by hand: ``gradtx.adamw(1e-3)`` *is*, by value,
``gradtx.chain(gradtx.scale_by_adam(), gradtx.add_decoupled_weight_decay(1e-4),
gradtx.scale_by_learning_rate(1e-3))``. The math of each member is documented once, on the
primitive.

Conventions shared by all aliases:

* Argument names and defaults are Optax's where Optax has the optimizer (``learning_rate``, ``b1``,
  ``b2``, ``eps``, ``eps_root``, ``momentum``, ``nesterov``, ``decay``, ...), so switching is a
  change of import (exceptions are listed in each docstring). Where a default differs from
  ``torch.optim``'s, the docstring gives the torch-equivalent call; :func:`gradtx.from_torch`
  builds the exact torch equivalent of any supported torch optimizer call.
* ``learning_rate`` is required (except for :func:`adadelta` and :func:`adafactor`), ``>= 0``, a
  float or a schedule.
* Every alias accepts ``weight_decay`` (``λ``, ``>= 0``, a float or a schedule) and ``mask`` (which
  parameters are decayed: a tree of bools, a callable ``params -> tree`` or a :mod:`gradtx.masks`
  selector; ``None`` decays all). Where the decay stands in the chain is its meaning:

  - *coupled* (L2 regularisation, torch's ``weight_decay``): ``add_decoupled_weight_decay`` is the
    first member, so ``λp`` is added to the gradient and passes through the moments. Used by
    :func:`sgd`, :func:`adagrad`, :func:`adadelta`, :func:`rmsprop`, :func:`adam`, :func:`nadam`,
    :func:`amsgrad`, :func:`adamax` and :func:`radam` (as ``torch.optim`` does for each of them).
  - *decoupled* (AdamW): right after the scaling and before ``scale_by_learning_rate``, so
    ``p ← p − γ(u + λp)``. Used by :func:`adamw`, :func:`nadamw`, :func:`adabelief`,
    :func:`lion`, :func:`sign_sgd`, :func:`adafactor` and :func:`lamb` (before the trust ratio);
    :func:`lars` adds it before its trust ratio, as the LARS paper does.

* ``decay_peak_lr=α`` (on :func:`adamw`, :func:`nadamw`, :func:`adabelief`, :func:`lion`,
  :func:`sign_sgd`, :func:`adafactor`) selects the AdamW *paper*'s convention: with
  ``learning_rate = α·η_t`` the update is ``p ← p − η_t(α·u + λp)``, i.e. the decay follows the
  schedule's shape but not its peak value. It is a decay of rate ``λ/α`` at the same place in
  the chain. ``None`` (default) is the torch/Optax convention ``p ← p − γ_t(u + λp)``.
* **Omitted members.** Members that would do nothing are left out so chains stay short: with
  ``weight_decay=0`` (a float) there is no ``add_decoupled_weight_decay``; with ``momentum=0`` (or
  ``None``) there is no ``trace``. The optimizer *state* structure therefore depends on whether those
  numbers are zero (as in Optax, whose ``sgd(momentum=None)`` has no trace state): build the
  optimizer with a non-zero value (or a schedule, which is never omitted) if a checkpoint must be
  restored across such a change.
* Alias-level arguments are validated when the alias is called; errors name the alias and its
  argument, e.g. ``adamw: learning_rate=-1.0 is out of range; expected 0.0 <= learning_rate.``
"""

from __future__ import annotations

from typing import Any

from gradtx import _validate, schedules
from gradtx.combine import chain, masked
from gradtx.transforms.adam import scale_by_adam, scale_by_adamax, scale_by_belief, scale_by_radam
from gradtx.transforms.adaptive import (scale_by_adadelta, scale_by_rms, scale_by_rss,
                                        scale_by_stddev)
from gradtx.transforms.decay import add_decoupled_weight_decay
from gradtx.transforms.factored import scale_by_factored_rms, scale_by_param_block_rms
from gradtx.transforms.momentum import ema, trace
from gradtx.transforms.scaling import scale_by_learning_rate
from gradtx.transforms.sign import scale_by_lion, scale_by_sign
from gradtx.transforms.trust_ratio import scale_by_trust_ratio

__all__ = [
    "sgd", "adagrad", "adadelta", "rmsprop", "adam", "adamw", "nadam", "nadamw", "radam",
    "adamax", "amsgrad", "adabelief", "adafactor", "lamb", "lars", "lion", "sign_sgd",
]

_UNIT = dict(low=0.0, high=1.0, high_open=True)      # a decay rate in [0, 1)
_NONNEG = dict(low=0.0)
_POS = dict(low=0.0, low_open=True)


def _num(alias: str, name: str, value: Any, **spec):
    """Validate one alias argument; the error names the alias and the argument."""
    return _validate.check_number(alias, name, value, **spec)


def _lr(alias: str, learning_rate: Any):
    return _num(alias, "learning_rate", learning_rate, low=0.0, allow_schedule=True)


def _is_zero(value: Any) -> bool:
    """True for None or a concrete number equal to 0 (a schedule or a traced value never is)."""
    if value is None:
        return True
    if _validate.is_schedule(value) or _validate.is_traced(value):
        return False
    return value == 0


def _decay(alias: str, weight_decay: Any, mask: Any, decay_peak_lr: Any = None) -> tuple:
    """The weight-decay member (as a 0- or 1-tuple), validated with the alias's argument names."""
    weight_decay = _num(alias, "weight_decay", weight_decay, low=0.0, allow_schedule=True)
    if decay_peak_lr is not None:
        decay_peak_lr = _num(alias, "decay_peak_lr", decay_peak_lr, **_POS)
        if _validate.is_schedule(weight_decay):
            raise ValueError(
                f"{alias}: decay_peak_lr={decay_peak_lr!r} needs a float weight_decay, got the "
                f"schedule {weight_decay!r}; pass a weight-decay schedule already divided by the "
                f"peak learning rate as weight_decay instead (and decay_peak_lr=None).")
    # Built even when omitted, so that a malformed mask fails here rather than at a later call.
    member = add_decoupled_weight_decay(weight_decay, mask=mask)
    if _is_zero(weight_decay):
        return ()
    if decay_peak_lr is not None:
        member = add_decoupled_weight_decay(weight_decay / decay_peak_lr, mask=mask)
    return (member,)


def _momentum(alias: str, momentum: Any, nesterov: bool, dampening: float = 0.0) -> tuple:
    """The momentum member (0- or 1-tuple); ``None`` or 0 means no momentum."""
    if momentum is not None:
        momentum = _num(alias, "momentum", momentum, low=0.0, high=1.0, allow_schedule=True)
    nesterov = _validate.check_bool(alias, "nesterov", nesterov)
    dampening = _num(alias, "dampening", dampening, low=0.0, high=1.0)
    if _is_zero(momentum):
        if nesterov:
            raise ValueError(f"{alias}: nesterov=True needs momentum > 0 (got "
                             f"momentum={momentum!r}); set a momentum or nesterov=False.")
        return ()
    return (trace(decay=momentum, nesterov=nesterov, dampening=dampening),)


# ------------------------------------------------------------------------------------------------
# SGD family

def sgd(learning_rate, momentum=0.0, nesterov=False, dampening=0.0, weight_decay=0.0,
        mask=None) -> chain:
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),          # if weight_decay != 0
              trace(decay=momentum, nesterov=nesterov, dampening=dampening),  # if momentum != 0
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled, L2), the momentum buffer of :class:`gradtx.trace` (torch's,
    with its first-step rule), ``p ← p − γ·u``. Defaults: no momentum, no dampening, no decay.
    ``momentum`` is in ``[0, 1]`` or a schedule (``None`` means 0, as in Optax); ``nesterov=True``
    needs ``momentum > 0``; ``dampening`` (in ``[0, 1]``) is ignored without momentum.

    torch: ``SGD(params, lr=γ, momentum=μ, dampening=τ, weight_decay=λ, nesterov=n)`` is exactly
    ``sgd(γ, momentum=μ, nesterov=n, dampening=τ, weight_decay=λ)`` (torch's ``lr`` defaults to
    1e-3; gradtx requires it). Optax: ``optax.sgd(learning_rate, momentum, nesterov)`` is the same
    chain (Optax has no decay and no dampening).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.sgd(0.5, momentum=0.5)
        >>> tx == gradtx.chain(gradtx.trace(decay=0.5), gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.array([1.0, -2.0])
        >>> state = tx.init(params)
        >>> u, state = tx.update(jnp.array([1.0, 2.0]), state, params)
        >>> u, state = tx.update(jnp.array([1.0, 2.0]), state, params)
        >>> u.tolist()
        [-0.75, -1.5]
    """
    alias = "sgd"
    learning_rate = _lr(alias, learning_rate)
    return chain(*_decay(alias, weight_decay, mask),
                 *_momentum(alias, momentum, nesterov, dampening),
                 scale_by_learning_rate(learning_rate))


def sign_sgd(learning_rate, weight_decay=0.0, mask=None, decay_peak_lr=None) -> chain:
    """signSGD (Bernstein et al. 2018): step by the sign of the gradient, with decoupled decay.

    The chain::

        chain(scale_by_sign(),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_learning_rate(learning_rate))

    Math: ``p ← p − γ(sign(g) + λp)`` (see :class:`gradtx.scale_by_sign`). The decay is decoupled
    (an L2 term inside the sign would be lost to saturation); with ``decay_peak_lr=α`` its rate is
    ``λ/α`` (the AdamW paper's convention, see the module docs). Default: no decay.
    Optax: ``optax.sign_sgd(learning_rate)`` (no decay). torch has no signSGD.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.sign_sgd(0.5, weight_decay=0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_sign(), gradtx.add_decoupled_weight_decay(0.5),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.array([1.0, 4.0])
        >>> tx.update(jnp.array([3.0, -0.25]), tx.init(params), params)[0].tolist()
        [-0.75, -0.5]
    """
    alias = "sign_sgd"
    learning_rate = _lr(alias, learning_rate)
    return chain(scale_by_sign(), *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))


def lion(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None, mu_dtype=None,
         decay_peak_lr=None) -> chain:
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, with decoupled decay.

    The chain::

        chain(scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_learning_rate(learning_rate))

    Math: ``p ← p − γ(sign(β₁m + (1−β₁)g) + λp)``, then ``m ← β₂m + (1−β₂)g`` (see
    :class:`gradtx.scale_by_lion`). Defaults are Optax's and the paper's: ``b1=0.9``, ``b2=0.99``,
    ``weight_decay=1e-3``. Use a learning rate 3-10x smaller and a decay 3-10x larger than for
    AdamW. ``decay_peak_lr=α``: the AdamW paper's decay convention (see the module docs).
    Optax: ``optax.lion`` (same chain). torch has no built-in Lion.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.lion(0.5, weight_decay=0.0)
        >>> tx == gradtx.chain(gradtx.scale_by_lion(), gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.zeros(2)
        >>> tx.update(jnp.array([3.0, -0.25]), tx.init(params), params)[0].tolist()
        [-0.5, 0.5]
    """
    alias = "lion"
    learning_rate = _lr(alias, learning_rate)
    b1 = _num(alias, "b1", b1, low=0.0, high=1.0)
    b2 = _num(alias, "b2", b2, low=0.0, high=1.0)
    return chain(scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
                 *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))


# ------------------------------------------------------------------------------------------------
# Adaptive (Adagrad / RMSprop / Adadelta)

def adagrad(learning_rate, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False,
            weight_decay=0.0, mask=None) -> chain:
    """Adagrad (Duchi et al. 2011): divide by the root of the sum of all squared gradients.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps,
                           eps_in_sqrt=eps_in_sqrt),
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled L2), ``s ← s + g²``, ``p ← p − γ·g/(√s + ε)`` (see
    :class:`gradtx.scale_by_rss`). Defaults are torch's: ``initial_accumulator_value=0.0``,
    ``eps=1e-10`` outside the root.

    torch: ``Adagrad(params, lr=γ, weight_decay=λ, initial_accumulator_value=s₀, eps=ε)`` is exactly
    ``adagrad(γ, s₀, ε, weight_decay=λ)``; torch's ``lr_decay`` is the learning-rate schedule
    ``γ/(1 + t·lr_decay)`` (:func:`gradtx.from_torch` builds it). **Differs from Optax**, whose
    ``optax.adagrad(learning_rate)`` defaults to ``initial_accumulator_value=0.1`` and ``eps=1e-7``
    inside the root: ``adagrad(γ, 0.1, 1e-7, eps_in_sqrt=True)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adagrad(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_rss(initial_accumulator_value=0.0, eps=1e-10),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.zeros(2)
        >>> state = tx.init(params)
        >>> u, state = tx.update(jnp.array([3.0, -4.0]), state, params)
        >>> u, state = tx.update(jnp.array([4.0, -3.0]), state, params)
        >>> [round(x, 4) for x in u.tolist()]
        [-0.4, 0.3]
    """
    alias = "adagrad"
    learning_rate = _lr(alias, learning_rate)
    initial_accumulator_value = _num(alias, "initial_accumulator_value",
                                     initial_accumulator_value, **_NONNEG)
    eps = _num(alias, "eps", eps, **_POS)
    eps_in_sqrt = _validate.check_bool(alias, "eps_in_sqrt", eps_in_sqrt)
    return chain(*_decay(alias, weight_decay, mask),
                 scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps,
                              eps_in_sqrt=eps_in_sqrt),
                 scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
            centered=False, momentum=0.0, nesterov=False, weight_decay=0.0, mask=None) -> chain:
    """RMSprop (Tieleman & Hinton 2012), optionally centered and with momentum.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),    # if weight_decay != 0
              scale_by_rms(decay=decay, eps=eps, initial_scale=initial_scale,
                           eps_in_sqrt=eps_in_sqrt),     # scale_by_stddev(same) if centered
              trace(decay=momentum, nesterov=nesterov),  # if momentum != 0
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled L2), ``v ← αv + (1−α)g²``, ``d = g/(√v + ε)`` (``√(v + ε)``
    with ``eps_in_sqrt``; ``√(v − ḡ²)`` when centered: :class:`gradtx.scale_by_rms`,
    :class:`gradtx.scale_by_stddev`), ``b ← μb + d`` (momentum), ``p ← p − γ·b``. The momentum
    buffer accumulates the *unscaled* ``d`` and the current learning rate multiplies it, as in
    torch (Optax puts its trace after the learning rate; identical for a constant rate).
    Defaults are Optax's: ``decay=0.9``, ``eps=1e-8`` inside the root, no momentum.

    torch: ``RMSprop(params, lr=γ, alpha=α, eps=ε, weight_decay=λ, momentum=μ, centered=c)`` is
    exactly ``rmsprop(γ, decay=α, eps=ε, eps_in_sqrt=False, centered=c, momentum=μ,
    weight_decay=λ)``; note torch's defaults ``alpha=0.99`` and ``eps`` outside the root.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.rmsprop(0.5, decay=0.75, eps=1e-30)
        >>> tx == gradtx.chain(gradtx.scale_by_rms(decay=0.75, eps=1e-30, eps_in_sqrt=True),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.zeros(2)
        >>> tx.update(jnp.array([1.0, -2.0]), tx.init(params), params)[0].tolist()
        [-1.0, 1.0]
    """
    alias = "rmsprop"
    learning_rate = _lr(alias, learning_rate)
    decay = _num(alias, "decay", decay, low=0.0, high=1.0)
    eps = _num(alias, "eps", eps, **_POS)
    initial_scale = _num(alias, "initial_scale", initial_scale, **_NONNEG)
    eps_in_sqrt = _validate.check_bool(alias, "eps_in_sqrt", eps_in_sqrt)
    centered = _validate.check_bool(alias, "centered", centered)
    scaling = scale_by_stddev if centered else scale_by_rms
    return chain(*_decay(alias, weight_decay, mask),
                 scaling(decay=decay, eps=eps, initial_scale=initial_scale,
                         eps_in_sqrt=eps_in_sqrt),
                 *_momentum(alias, momentum, nesterov),
                 scale_by_learning_rate(learning_rate))


def adadelta(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, mask=None) -> chain:
    """Adadelta (Zeiler 2012): a unit-correct step from running averages of g² and Δ².

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_adadelta(rho=rho, eps=eps),
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled L2) then :class:`gradtx.scale_by_adadelta`
    (``Δ = √(u+ε)/√(v+ε)·g``), ``p ← p − γΔ``. Defaults are torch's and Optax's (``rho=0.9``,
    ``eps=1e-6``), with ``learning_rate=1.0`` (torch's; Optax's default is ``None``).

    torch: ``Adadelta(params, lr=γ, rho=ρ, eps=ε, weight_decay=λ)`` is exactly
    ``adadelta(γ, ρ, ε, weight_decay=λ)``. Optax: ``optax.adadelta(learning_rate, rho, eps,
    weight_decay, weight_decay_mask)`` is the same chain (its ``weight_decay_mask`` is ``mask``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adadelta(weight_decay=0.5)
        >>> tx == gradtx.chain(gradtx.add_decoupled_weight_decay(0.5), gradtx.scale_by_adadelta(),
        ...                    gradtx.scale_by_learning_rate(1.0))
        True
    """
    alias = "adadelta"
    learning_rate = _lr(alias, learning_rate)
    rho = _num(alias, "rho", rho, low=0.0, high=1.0)
    eps = _num(alias, "eps", eps, **_POS)
    return chain(*_decay(alias, weight_decay, mask), scale_by_adadelta(rho=rho, eps=eps),
                 scale_by_learning_rate(learning_rate))


# ------------------------------------------------------------------------------------------------
# Adam family

def _adam_args(alias, b1, b2, eps, eps_root):
    return (_num(alias, "b1", b1, **_UNIT), _num(alias, "b2", b2, **_UNIT),
            _num(alias, "eps", eps, **_NONNEG), _num(alias, "eps_root", eps_root, **_NONNEG))


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0, mask=None,
         mu_dtype=None, nu_dtype=None, *, nesterov=False) -> chain:
    """Adam (Kingma & Ba 2015), with optional L2 (coupled) weight decay.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                            mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (L2: the decay passes through the moments), then
    :class:`gradtx.scale_by_adam` (``m̂/(√(v̂ + ε_root) + ε)``), ``p ← p − γ·u``. Defaults are
    Optax's and torch's: ``b1=0.9``, ``b2=0.999``, ``eps=1e-8``, ``eps_root=0``, no decay. For
    decoupled decay use :func:`adamw`; ``nesterov=True`` is :func:`nadam`.

    torch: ``Adam(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ)`` is exactly
    ``adam(γ, β₁, β₂, ε, weight_decay=λ)``. Optax: ``optax.adam`` is the same chain (Optax's
    ``adam`` has no ``weight_decay``).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adam(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(), gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.zeros(2)
        >>> u, _ = tx.update(jnp.array([3.0, -2.0]), tx.init(params), params)
        >>> [round(x, 4) for x in u.tolist()]      # the first Adam step is -lr * sign(g)
        [-0.5, 0.5]
    """
    alias = "adam"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(*_decay(alias, weight_decay, mask),
                 scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                               mu_dtype=mu_dtype, nu_dtype=nu_dtype),
                 scale_by_learning_rate(learning_rate))


def amsgrad(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0, mask=None,
            mu_dtype=None, nu_dtype=None) -> chain:
    """AMSGrad (Reddi et al. 2018): Adam with a non-decreasing second moment.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, amsgrad=True,
                            mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              scale_by_learning_rate(learning_rate))

    Math: as :func:`adam` with ``v_max = max(v_max, v)`` on the raw ``v``, then bias-corrected
    (torch's AMSGrad; see :class:`gradtx.scale_by_adam`). Defaults as :func:`adam`.

    torch: ``Adam(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ, amsgrad=True)`` is exactly
    ``amsgrad(γ, β₁, β₂, ε, weight_decay=λ)``. Optax: ``optax.amsgrad`` (no decay).

    Example:
        >>> import gradtx
        >>> tx = gradtx.amsgrad(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(amsgrad=True),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "amsgrad"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(*_decay(alias, weight_decay, mask),
                 scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, amsgrad=True,
                               mu_dtype=mu_dtype, nu_dtype=nu_dtype),
                 scale_by_learning_rate(learning_rate))


def _nesterov_adam(alias, b1, b2, eps, eps_root, momentum_decay, mu_dtype, nu_dtype):
    if momentum_decay is not None:
        momentum_decay = _num(alias, "momentum_decay", momentum_decay, **_POS)
    return scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=True,
                         momentum_decay=momentum_decay, mu_dtype=mu_dtype, nu_dtype=nu_dtype)


def nadam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0, mask=None,
          mu_dtype=None, nu_dtype=None, *, momentum_decay=None) -> chain:
    """NAdam (Dozat 2016): Adam with Nesterov momentum, with optional L2 (coupled) decay.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=True,
                            momentum_decay=momentum_decay, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              scale_by_learning_rate(learning_rate))

    Math: :class:`gradtx.scale_by_adam` with ``nesterov=True``: with ``momentum_decay=None``
    (default, Optax's NAdam) a constant ``β₁``; with ``momentum_decay=ψ`` torch's schedule
    ``μ_t = β₁(1 − ½·0.96^{tψ})``. Defaults as :func:`adam`.

    torch: ``NAdam(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ, momentum_decay=ψ)`` is
    exactly ``nadam(γ, β₁, β₂, ε, weight_decay=λ, momentum_decay=ψ)`` (torch's defaults:
    ``lr=2e-3``, ``ψ=4e-3``). Optax: ``optax.nadam`` is ``momentum_decay=None`` (no decay).

    Example:
        >>> import gradtx
        >>> tx = gradtx.nadam(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(nesterov=True),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "nadam"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(*_decay(alias, weight_decay, mask),
                 _nesterov_adam(alias, b1, b2, eps, eps_root, momentum_decay, mu_dtype, nu_dtype),
                 scale_by_learning_rate(learning_rate))


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4, mask=None,
          mu_dtype=None, nu_dtype=None, decay_peak_lr=None, *, nesterov=False) -> chain:
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

    The chain::

        chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                            mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0;
                                 # rate weight_decay / decay_peak_lr when decay_peak_lr is given
              scale_by_learning_rate(learning_rate))

    Math: ``p ← p − γ_t(m̂/(√v̂ + ε) + λp)`` (torch's and Optax's convention: the decay is scaled
    by the learning rate). With ``decay_peak_lr=α`` and ``learning_rate = α·η_t`` (a schedule
    whose peak is α): ``p ← p − η_t(α·m̂/(√v̂ + ε) + λp)``, the paper's convention, where the
    decay follows the schedule multiplier only. Defaults are Optax's: ``weight_decay=1e-4``.

    torch: ``AdamW(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ)`` is exactly
    ``adamw(γ, β₁, β₂, ε, weight_decay=λ)``; **torch's default decay is 1e-2** (Optax's and
    gradtx's 1e-4): ``AdamW(params, lr=γ)`` is ``adamw(γ, weight_decay=1e-2)``.
    Optax: ``optax.adamw`` (same chain).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adamw(0.5, weight_decay=0.25)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(), gradtx.add_decoupled_weight_decay(0.25),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.array([2.0, 2.0])
        >>> u, _ = tx.update(jnp.array([3.0, -2.0]), tx.init(params), params)
        >>> [round(x, 4) for x in u.tolist()]      # -0.5 * (sign(g) + 0.25 * p)
        [-0.75, 0.25]
        >>> gradtx.adamw(0.5, weight_decay=0.25, decay_peak_lr=0.5).transforms[1]
        add_decoupled_weight_decay(rate=0.5)
    """
    alias = "adamw"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                               mu_dtype=mu_dtype, nu_dtype=nu_dtype),
                 *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))


def nadamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4, mask=None,
           mu_dtype=None, nu_dtype=None, decay_peak_lr=None, *, momentum_decay=None) -> chain:
    """NAdamW: NAdam with decoupled weight decay (AdamW's placement).

    The chain::

        chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=True,
                            momentum_decay=momentum_decay, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_learning_rate(learning_rate))

    Math: as :func:`adamw` with the Nesterov numerator of :func:`nadam` (constant ``β₁`` by
    default; torch's ``μ_t`` schedule with ``momentum_decay=ψ``). ``decay_peak_lr``: as
    :func:`adamw`. Defaults are Optax's (``weight_decay=1e-4``).

    torch: ``NAdam(params, lr=γ, weight_decay=λ, decoupled_weight_decay=True)`` is exactly
    ``nadamw(γ, weight_decay=λ, momentum_decay=4e-3)``. Optax: ``optax.nadamw`` is
    ``momentum_decay=None``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.nadamw(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(nesterov=True),
        ...                    gradtx.add_decoupled_weight_decay(1e-4),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "nadamw"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(_nesterov_adam(alias, b1, b2, eps, eps_root, momentum_decay, mu_dtype, nu_dtype),
                 *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))


def adamax(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, mask=None) -> chain:
    """Adamax (Kingma & Ba 2015, §7): Adam with an infinity-norm second moment.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_adamax(b1=b1, b2=b2, eps=eps),
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled L2, as torch), then :class:`gradtx.scale_by_adamax`
    (``u = max(β₂u, |g| + ε)``, ``m̂/u``), ``p ← p − γ·…``. Defaults are Optax's and torch's.

    torch: ``Adamax(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ)`` is exactly
    ``adamax(γ, β₁, β₂, ε, weight_decay=λ)`` (torch's ``lr`` defaults to 2e-3).
    Optax: ``optax.adamax`` (same chain, no decay).

    Example:
        >>> import gradtx
        >>> tx = gradtx.adamax(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adamax(), gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "adamax"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, _ = _adam_args(alias, b1, b2, eps, 0.0)
    eps = _num(alias, "eps", eps, **_POS)
    return chain(*_decay(alias, weight_decay, mask), scale_by_adamax(b1=b1, b2=b2, eps=eps),
                 scale_by_learning_rate(learning_rate))


def radam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, weight_decay=0.0,
          mask=None) -> chain:
    """RAdam (Liu et al. 2020): Adam with a rectified (variance-corrected) adaptive step.

    The chain::

        chain(add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_radam(b1=b1, b2=b2, eps=eps, threshold=threshold),
              scale_by_learning_rate(learning_rate))

    Math: ``g ← g + λp`` (coupled L2, torch's default), then :class:`gradtx.scale_by_radam`
    (the rectified Adam step when ``ρ_t > threshold``, else the bias-corrected momentum).
    Defaults are Optax's and torch's (``threshold=5``).

    torch: ``RAdam(params, lr=γ, betas=(β₁, β₂), eps=ε, weight_decay=λ)`` is exactly
    ``radam(γ, β₁, β₂, ε, weight_decay=λ)``; torch's ``decoupled_weight_decay=True`` is
    ``chain(scale_by_radam(...), add_decoupled_weight_decay(λ), scale_by_learning_rate(γ))``
    (:func:`gradtx.from_torch` builds it). Optax: ``optax.radam`` (same chain, no decay).

    Example:
        >>> import gradtx
        >>> tx = gradtx.radam(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_radam(), gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "radam"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, _ = _adam_args(alias, b1, b2, eps, 0.0)
    eps = _num(alias, "eps", eps, **_POS)
    threshold = _num(alias, "threshold", threshold, low=4.0)
    return chain(*_decay(alias, weight_decay, mask),
                 scale_by_radam(b1=b1, b2=b2, eps=eps, threshold=threshold),
                 scale_by_learning_rate(learning_rate))


def adabelief(learning_rate, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, weight_decay=0.0,
              mask=None, decay_peak_lr=None) -> chain:
    """AdaBelief (Zhuang et al. 2020): Adam whose second moment tracks the belief ``(g − m)²``.

    The chain::

        chain(scale_by_belief(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_learning_rate(learning_rate))

    Math: :class:`gradtx.scale_by_belief`, then ``p ← p − γ(u + λp)``: the decay is decoupled, as
    in the reference implementation's default (``weight_decouple=True``). ``decay_peak_lr``: as
    :func:`adamw`. Defaults are Optax's and the paper's: ``eps=1e-16``, ``eps_root=1e-16``, no
    decay. Optax: ``optax.adabelief`` (same chain, no decay). torch has no built-in AdaBelief.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adabelief(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_belief(), gradtx.scale_by_learning_rate(0.5))
        True
    """
    alias = "adabelief"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(scale_by_belief(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
                 *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))


# ------------------------------------------------------------------------------------------------
# Trust-ratio family

def lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0,
         mask=None) -> chain:
    """LAMB (You et al. 2020): AdamW's direction rescaled per leaf by the trust ratio ‖p‖/‖u‖.

    The chain::

        chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_trust_ratio(),
              scale_by_learning_rate(learning_rate))

    Math: ``u = m̂/(√v̂ + ε) + λp``, ``p ← p − γ·(‖p‖/‖u‖)·u`` per leaf (ratio 1 where either norm
    is 0; see :class:`gradtx.scale_by_trust_ratio`). Defaults are Optax's: ``eps=1e-6``, no
    decay. (The trust ratio normalises the step, so there is no ``decay_peak_lr`` here.)
    NVIDIA's LAMB also pre-normalises ``g`` by the global norm: prepend
    :class:`gradtx.clip_by_global_norm` for a similar effect. Optax: ``optax.lamb`` (same
    chain). torch has no built-in LAMB.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.lamb(0.5)
        >>> tx == gradtx.chain(gradtx.scale_by_adam(eps=1e-6), gradtx.scale_by_trust_ratio(),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.array([3.0, 4.0])
        >>> u, _ = tx.update(jnp.array([1.0, -1.0]), tx.init(params), params)
        >>> [round(x, 4) for x in u.tolist()]     # a step of norm 0.5 * ||p||
        [-1.7678, 1.7678]
    """
    alias = "lamb"
    learning_rate = _lr(alias, learning_rate)
    b1, b2, eps, eps_root = _adam_args(alias, b1, b2, eps, eps_root)
    return chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
                 *_decay(alias, weight_decay, mask),
                 scale_by_trust_ratio(),
                 scale_by_learning_rate(learning_rate))


def lars(learning_rate, weight_decay=0.0, mask=None, trust_coefficient=0.001, eps=0.0,
         momentum=0.9, nesterov=False) -> chain:
    """LARS (You et al. 2017): momentum SGD on layer-wise trust-ratio scaled steps.

    The chain (``mask=None``)::

        chain(add_decoupled_weight_decay(weight_decay),                 # if weight_decay != 0
              scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps, form="lars",
                                   weight_decay=weight_decay),
              trace(decay=momentum, nesterov=nesterov),                 # if momentum != 0
              scale_by_learning_rate(learning_rate))

    and with a ``mask`` the first two members apply to the selected parameters only:
    ``chain(masked(chain(add_decoupled_weight_decay(...), scale_by_trust_ratio(...)), mask),
    trace(...), scale_by_learning_rate(learning_rate))``.

    Math (the paper's): ``u = g + λp``; per leaf ``u ← η‖p‖/(‖g‖ + λ‖p‖ + ε) · u`` (the LARS form
    of :class:`gradtx.scale_by_trust_ratio`, ``η`` the trust coefficient); momentum
    ``b ← μb + u``; ``p ← p − γ·b``. ``mask`` selects the parameters LARS adapts: they get the
    decay *and* the trust ratio (the two go together in the paper's formula); the others (usually
    biases and normalisation scales) get plain momentum SGD, as in common LARS practice.
    Defaults are Optax's: ``trust_coefficient=0.001``, ``eps=0``, ``momentum=0.9``, no decay.
    ``weight_decay`` must be a float here (the trust ratio uses it).

    Optax: ``optax.lars`` differs in documented ways: its ratio is ``η‖p‖/(‖g + λp‖ + ε)`` (equal
    when ``weight_decay=0``); it has separate ``weight_decay_mask`` and ``trust_ratio_mask``; it
    applies the momentum after the learning rate (identical for a constant rate). torch has no
    built-in LARS.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.lars(0.5, momentum=0.0, trust_coefficient=1.0)
        >>> tx == gradtx.chain(gradtx.scale_by_trust_ratio(trust_coefficient=1.0, form="lars"),
        ...                    gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.array([3.0, 4.0])                   # ||p|| = 5
        >>> u, _ = tx.update(jnp.array([0.3, 0.4]), tx.init(params), params)   # ||g|| = 0.5
        >>> [round(x, 4) for x in u.tolist()]                # -0.5 * (5 / 0.5) * g
        [-1.5, -2.0]
    """
    alias = "lars"
    learning_rate = _lr(alias, learning_rate)
    weight_decay = _num(alias, "weight_decay", weight_decay, **_NONNEG)
    trust_coefficient = _num(alias, "trust_coefficient", trust_coefficient, **_NONNEG)
    eps = _num(alias, "eps", eps, **_NONNEG)
    adapt = (*_decay(alias, weight_decay, None),
             scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps, form="lars",
                                  weight_decay=weight_decay))
    if mask is not None:
        adapt = (masked(chain(*adapt), mask),)
    return chain(*adapt, *_momentum(alias, momentum, nesterov),
                 scale_by_learning_rate(learning_rate))


# ------------------------------------------------------------------------------------------------
# Adafactor

def _relative_step():
    """Adafactor's relative step size ``ρ_t = min(1e-2, 1/√t)`` (t from 1) as a schedule of the
    step count ``c = t - 1``: constant 1e-2 for ``c < 9999``, then ``1e-2·√(1e4/(1 + c))``."""
    return schedules.inverse_sqrt(1e-2, warmup_steps=9999, timescale=1e4, init_value=1e-2)


def adafactor(learning_rate=None, min_dim_size_to_factor=128, decay_rate=0.8,
              multiply_by_parameter_scale=True, clipping_threshold=1.0, momentum=None,
              dtype_momentum="float32", eps=1e-30, factored=True, weight_decay=0.0, mask=None,
              decay_peak_lr=None) -> chain:
    """Adafactor (Shazeer & Stern 2018): a factored second moment, update clipping, relative steps.

    The chain::

        chain(scale_by_factored_rms(factored=factored, decay_rate=decay_rate, epsilon=eps,
                                    clipping_threshold=clipping_threshold,
                                    min_dim_size_to_factor=min_dim_size_to_factor),
              scale_by_param_block_rms(),              # if multiply_by_parameter_scale
              ema(decay=momentum, debias=False, accumulator_dtype=dtype_momentum),
                                                       # if momentum (not None or 0)
              add_decoupled_weight_decay(weight_decay, mask=mask),   # if weight_decay != 0
              scale_by_learning_rate(learning_rate))   # the relative step if learning_rate is None

    Math: :class:`gradtx.scale_by_factored_rms` (``G/√V̂`` with the rank-1 ``V̂`` for large
    matrices, ``β̂₂ₜ = 1 − t^{−decay_rate}``, clipped to ``RMS ≤ clipping_threshold``), times
    ``max(1e-3, RMS(p))`` (:class:`gradtx.scale_by_param_block_rms`), optional momentum, then
    ``p ← p − γ_t(u + λp)`` (decoupled decay, scaled by the learning rate like every gradtx
    decay; ``decay_peak_lr``: as :func:`adamw`). ``learning_rate=None`` (default) is the paper's
    relative step ``γ_t = min(1e-2, 1/√t)``, the schedule
    ``gradtx.schedules.inverse_sqrt(1e-2, warmup_steps=9999, timescale=1e4, init_value=1e-2)``
    (constant 1e-2 for the first 9999 steps). Other defaults are Optax's.

    Optax: ``optax.adafactor`` uses the same names (``weight_decay_rate`` and
    ``weight_decay_mask`` are ``weight_decay`` and ``mask`` here) and differs in three documented
    ways: with ``learning_rate=None`` Optax applies no step-size schedule at all (pass
    ``learning_rate=1.0`` here for that); Optax's decay is not scaled by the learning rate
    (``optax.adafactor(γ, weight_decay_rate=λ)`` is ``adafactor(γ, weight_decay=λ/γ)`` for a
    constant ``γ``); its momentum is taken after the learning rate (identical for a constant
    rate). ``decay_offset`` is not offered. torch has no built-in Adafactor before 2.5;
    ``torch.optim.Adafactor`` (2.5+) is not mapped.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adafactor(learning_rate=0.5, multiply_by_parameter_scale=False)
        >>> tx == gradtx.chain(gradtx.scale_by_factored_rms(), gradtx.scale_by_learning_rate(0.5))
        True
        >>> params = jnp.zeros(2)
        >>> u, _ = tx.update(jnp.array([3.0, -3.0]), tx.init(params), params)
        >>> [round(x, 4) for x in u.tolist()]
        [-0.5, 0.5]
        >>> schedule = gradtx.adafactor().transforms[-1].learning_rate   # min(1e-2, 1/sqrt(t))
        >>> [round(float(schedule(t - 1)), 6) for t in (1, 10_000, 40_000)]
        [0.01, 0.01, 0.005]
    """
    alias = "adafactor"
    if learning_rate is None:
        learning_rate = _relative_step()
    learning_rate = _lr(alias, learning_rate)
    decay_rate = _num(alias, "decay_rate", decay_rate, low=0.0, high=1.0, low_open=True)
    eps = _num(alias, "eps", eps, **_POS)
    if clipping_threshold is not None:
        clipping_threshold = _num(alias, "clipping_threshold", clipping_threshold, **_POS)
    multiply_by_parameter_scale = _validate.check_bool(alias, "multiply_by_parameter_scale",
                                                       multiply_by_parameter_scale)
    if momentum is not None:
        momentum = _num(alias, "momentum", momentum, **_UNIT)
    members = [scale_by_factored_rms(factored=factored, decay_rate=decay_rate, epsilon=eps,
                                     clipping_threshold=clipping_threshold,
                                     min_dim_size_to_factor=min_dim_size_to_factor)]
    if multiply_by_parameter_scale:
        members.append(scale_by_param_block_rms())
    if not _is_zero(momentum):
        members.append(ema(decay=momentum, debias=False, accumulator_dtype=dtype_momentum))
    return chain(*members, *_decay(alias, weight_decay, mask, decay_peak_lr),
                 scale_by_learning_rate(learning_rate))
