"""Porting from PyTorch: the gradtx chain that reproduces a ``torch.optim`` optimizer exactly.

``gradtx.from_torch("AdamW", lr=3e-4, weight_decay=0.1)`` returns the chain that makes, step for
step, the same parameter updates as ``torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)``
(up to float32 rounding; the test suite runs both for 100 steps and compares every step). gradtx
never imports torch: the mapping below is written from torch 2.13's update rules.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _validate
from gradtx.base import hyperparameter
from gradtx.combine import chain
from gradtx.schedules import Schedule
from gradtx.transforms.adam import scale_by_adam, scale_by_adamax, scale_by_radam
from gradtx.transforms.adaptive import (scale_by_adadelta, scale_by_rms, scale_by_rss,
                                        scale_by_stddev)
from gradtx.transforms.decay import add_decoupled_weight_decay
from gradtx.transforms.momentum import trace
from gradtx.transforms.scaling import scale, scale_by_learning_rate

__all__ = ["from_torch"]

_BETAS = (0.9, 0.999)

#: torch 2.13's defaults for every argument :func:`from_torch` supports, per optimizer.
TORCH_DEFAULTS: types.MappingProxyType = types.MappingProxyType({
    "SGD": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False),
    "Adam": dict(lr=1e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False),
    "AdamW": dict(lr=1e-3, betas=_BETAS, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False),
    "NAdam": dict(lr=2e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                  decoupled_weight_decay=False, maximize=False),
    "RAdam": dict(lr=1e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False),
    "Adamax": dict(lr=2e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0, maximize=False),
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False),
    "Adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, maximize=False),
    "Adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
})

#: torch arguments that only choose an implementation (loops, fused kernels, CUDA graphs,
#: autograd through the step). They do not change the math, so they are accepted and ignored.
_IGNORED = ("foreach", "fused", "capturable", "differentiable")


@dataclasses.dataclass(frozen=True, repr=False, eq=True)
class torch_adagrad_lr(Schedule):
    """torch ``Adagrad``'s decayed learning rate: ``lr / (1 + t·lr_decay)`` at step ``t`` (from 0).

    Built by ``from_torch("Adagrad", lr_decay=...)``; kept here because it only exists to port
    torch's ``Adagrad`` (equivalently: ``LambdaLR`` with ``lambda t: 1 / (1 + t·lr_decay)``).

    Example:
        >>> from gradtx.porting import torch_adagrad_lr
        >>> s = torch_adagrad_lr(lr=1.0, lr_decay=0.5)
        >>> [s(t).tolist() for t in (0, 2, 6)]
        [1.0, 0.5, 0.25]
    """

    lr: float = hyperparameter(low=0.0)
    lr_decay: float = hyperparameter(low=0.0)

    def _value(self, t, dtype):
        lr = jnp.asarray(self.lr, dtype)
        return lr / (1.0 + t.astype(dtype) * jnp.asarray(self.lr_decay, dtype))


def _scalar(owner: str, arg: str, value: Any) -> Any:
    """A torch scalar argument as a Python number (a 1-element tensor is unwrapped)."""
    if not isinstance(value, (numbers.Number, jax.Array)) and callable(getattr(value, "item", None)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise ValueError(f"{owner}: {arg} must be a number or a 1-element tensor, got "
                             f"{value!r}.") from None
    return value


def _num(owner: str, arg: str, value: Any, **spec) -> Any:
    return _validate.check_number(owner, arg, _scalar(owner, arg, value), **spec)


def _betas(owner: str, betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: betas={betas!r}; expected a pair (beta1, beta2) of numbers "
                         f"in [0, 1).") from None
    return (_num(owner, "betas[0]", b1, low=0.0, high=1.0, high_open=True),
            _num(owner, "betas[1]", b2, low=0.0, high=1.0, high_open=True))


def _flag(owner: str, arg: str, value: Any) -> bool:
    return _validate.check_bool(owner, arg, value)


def _decay(rate: float) -> tuple:
    return () if rate == 0 else (add_decoupled_weight_decay(rate),)


def _adam_like(core, lr, weight_decay, decoupled) -> tuple:
    """torch's two weight-decay placements around an Adam-like core.

    Coupled: ``grad += λ·p`` before the moments. Decoupled: torch's ``p ← p·(1 − γλ)`` before the
    step, which equals adding ``λp`` to the update before the learning rate (``p`` is the same
    pre-step value in both).
    """
    if decoupled:
        return (core, *_decay(weight_decay), scale_by_learning_rate(lr))
    return (*_decay(weight_decay), core, scale_by_learning_rate(lr))


def _sgd(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    momentum = _num(owner, "momentum", a["momentum"], low=0.0)
    dampening = _num(owner, "dampening", a["dampening"])
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    nesterov = _flag(owner, "nesterov", a["nesterov"])
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening=0 (torch "
                         f"raises for this too); got momentum={momentum!r}, "
                         f"dampening={dampening!r}.")
    members = (trace(decay=momentum, nesterov=nesterov, dampening=dampening),) if momentum else ()
    return (*_decay(weight_decay), *members, scale_by_learning_rate(lr))


def _adam(owner, a, decoupled_default=False):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    b1, b2 = _betas(owner, a["betas"])
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    amsgrad = _flag(owner, "amsgrad", a["amsgrad"])
    decoupled = _flag(owner, "decoupled_weight_decay",
                      a.get("decoupled_weight_decay", decoupled_default))
    core = scale_by_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad)
    return _adam_like(core, lr, weight_decay, decoupled)


def _adamw(owner, a):
    return _adam(owner, a, decoupled_default=True)


def _nadam(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    b1, b2 = _betas(owner, a["betas"])
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    momentum_decay = _num(owner, "momentum_decay", a["momentum_decay"], low=0.0)
    if momentum_decay == 0:
        raise ValueError(f"{owner}: momentum_decay=0 (torch's constant μ = β₁/2) is not "
                         f"supported; use a momentum_decay > 0.")
    decoupled = _flag(owner, "decoupled_weight_decay", a["decoupled_weight_decay"])
    core = scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=True, momentum_decay=momentum_decay)
    return _adam_like(core, lr, weight_decay, decoupled)


def _radam(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    b1, b2 = _betas(owner, a["betas"])
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    decoupled = _flag(owner, "decoupled_weight_decay", a["decoupled_weight_decay"])
    return _adam_like(scale_by_radam(b1=b1, b2=b2, eps=eps), lr, weight_decay, decoupled)


def _adamax(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    b1, b2 = _betas(owner, a["betas"])
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    return _adam_like(scale_by_adamax(b1=b1, b2=b2, eps=eps), lr, weight_decay, False)


def _rmsprop(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    alpha = _num(owner, "alpha", a["alpha"], low=0.0)
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    momentum = _num(owner, "momentum", a["momentum"], low=0.0)
    centered = _flag(owner, "centered", a["centered"])
    scaling = scale_by_stddev if centered else scale_by_rms
    members = (trace(decay=momentum),) if momentum else ()
    return (*_decay(weight_decay), scaling(decay=alpha, eps=eps, eps_in_sqrt=False), *members,
            scale_by_learning_rate(lr))


def _adagrad(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    lr_decay = _num(owner, "lr_decay", a["lr_decay"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    initial = _num(owner, "initial_accumulator_value", a["initial_accumulator_value"], low=0.0)
    eps = _num(owner, "eps", a["eps"], low=0.0)
    rate = torch_adagrad_lr(lr=lr, lr_decay=lr_decay) if lr_decay else lr
    return (*_decay(weight_decay),
            scale_by_rss(initial_accumulator_value=initial, eps=eps, eps_in_sqrt=False),
            scale_by_learning_rate(rate))


def _adadelta(owner, a):
    lr = _num(owner, "lr", a["lr"], low=0.0)
    rho = _num(owner, "rho", a["rho"], low=0.0, high=1.0)
    eps = _num(owner, "eps", a["eps"], low=0.0)
    weight_decay = _num(owner, "weight_decay", a["weight_decay"], low=0.0)
    return (*_decay(weight_decay), scale_by_adadelta(rho=rho, eps=eps),
            scale_by_learning_rate(lr))


_BUILDERS = {"SGD": _sgd, "Adam": _adam, "AdamW": _adamw, "NAdam": _nadam, "RAdam": _radam,
             "Adamax": _adamax, "RMSprop": _rmsprop, "Adagrad": _adagrad,
             "Adadelta": _adadelta}


_CORRESPONDENCE = ("learning_rate ← lr, b1/b2 ← betas, rate ← weight_decay, trace decay ← momentum, "
                   "scale_by_rms/scale_by_stddev decay ← alpha")


def from_torch(name: str, **torch_kwargs) -> chain:
    """The gradtx chain that reproduces ``torch.optim.<name>(params, **torch_kwargs)`` exactly.

    Supported (torch 2.13's arguments; an omitted argument takes torch's default, listed in
    :data:`TORCH_DEFAULTS`):

    ==========  =====================================================================================
    ``name``    chain (members in brackets only when their argument makes them do something)
    ==========  =====================================================================================
    SGD         [decay λ] → [``trace(momentum, nesterov, dampening)``] → lr
    Adam        [decay λ] → ``scale_by_adam(b1, b2, eps, amsgrad)`` → lr;
                with ``decoupled_weight_decay=True``: ``scale_by_adam`` → [decay λ] → lr
    AdamW       ``scale_by_adam(b1, b2, eps, amsgrad)`` → [decay λ] → lr  (torch's λ default 1e-2)
    NAdam       [decay λ] → ``scale_by_adam(b1, b2, eps, nesterov=True, momentum_decay)`` → lr
                (decay after the scaling with ``decoupled_weight_decay=True``)
    RAdam       [decay λ] → ``scale_by_radam(b1, b2, eps)`` → lr (idem)
    Adamax      [decay λ] → ``scale_by_adamax(b1, b2, eps)`` → lr
    RMSprop     [decay λ] → ``scale_by_rms(alpha, eps)`` (``scale_by_stddev`` if centered)
                → [``trace(momentum)``] → lr
    Adagrad     [decay λ] → ``scale_by_rss(initial_accumulator_value, eps)`` → lr, where lr is
                the schedule ``lr/(1 + t·lr_decay)`` when ``lr_decay > 0``
    Adadelta    [decay λ] → ``scale_by_adadelta(rho, eps)`` → lr
    ==========  =====================================================================================

    "decay λ" is ``add_decoupled_weight_decay(weight_decay)`` (before the scaling it is torch's
    coupled L2 ``grad += λ·p``; after it, torch's decoupled ``p ← p(1 − γλ)``), "lr" is
    ``scale_by_learning_rate(lr)``; all of ``eps`` are outside the square roots, as in torch.
    ``maximize=True`` (every optimizer) puts ``scale(-1.0)`` first. ``betas`` is torch's pair
    ``(b1, b2)``. Without ``maximize`` the result equals (by value) the gradtx alias with the
    same settings, e.g. ``from_torch("AdamW")`` is ``adamw(1e-3, weight_decay=1e-2)``.

    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` only choose torch's
    implementation, so they are accepted and ignored. Tensor-valued ``lr``/``betas`` (1-element)
    are read as numbers. A learning-rate scheduler is not an optimizer argument: give a
    :mod:`gradtx.schedules` schedule to the alias (or use ``gradtx.schedules.from_torch``).

    Not supported (``ValueError``): other optimizers; ``NAdam(momentum_decay=0)``. Ranges are
    checked as torch checks them where the gradtx primitives allow them (a momentum above 1 and
    ``eps=0`` for the adaptive methods are rejected: gradtx's primitives require
    ``momentum <= 1`` and ``eps > 0`` there).

    Example:
        >>> import gradtx
        >>> gradtx.from_torch("AdamW", lr=3e-4, weight_decay=0.1)
        chain(scale_by_adam(), add_decoupled_weight_decay(rate=0.1), scale_by_learning_rate(learning_rate=0.0003))
        >>> gradtx.from_torch("AdamW") == gradtx.adamw(1e-3, weight_decay=1e-2)
        True
        >>> gradtx.from_torch("SGD", lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=True)
        chain(scale(factor=-1.0), add_decoupled_weight_decay(rate=0.0005), trace(), scale_by_learning_rate(learning_rate=0.1))
        >>> gradtx.from_torch("Adam", lr=0.1, betas=(0.9, 0.99), foreach=True) == gradtx.adam(0.1, b2=0.99)
        True
        >>> gradtx.from_torch("LBFGS")
        Traceback (most recent call last):
        ...
        ValueError: from_torch: unknown optimizer 'LBFGS'; supported: SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta.
    """
    if name not in _BUILDERS:
        close = [n for n in _BUILDERS if n.lower() == str(name).lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"from_torch: unknown optimizer {name!r}{hint}; supported: "
                         f"{', '.join(_BUILDERS)}.")
    owner = f"from_torch({name!r})"
    defaults = TORCH_DEFAULTS[name]
    unknown = [k for k in torch_kwargs if k not in defaults and k not in _IGNORED]
    if unknown:
        raise ValueError(
            f"{owner}: unsupported argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; supported: {', '.join(defaults)} (and "
            f"{', '.join(_IGNORED)}, which only choose torch's implementation and are ignored).")
    for key in _IGNORED:
        if key in torch_kwargs and torch_kwargs[key] is not None:
            _flag(owner, key, torch_kwargs[key])
    args = {k: torch_kwargs.get(k, v) for k, v in defaults.items()}
    try:
        members = _BUILDERS[name](owner, args)
    except (ValueError, TypeError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in torch_kwargs.items()) or "torch's defaults"
        raise type(e)(f"{owner} with {given}: {e} (the gradtx member named there is built from "
                      f"the torch argument it corresponds to: {_CORRESPONDENCE})") from e
    if _flag(owner, "maximize", args["maximize"]):
        members = (scale(-1.0), *members)
    return chain(*members)
