"""Construction-time validation of hyperparameters (private).

Every public transform declares its hyperparameters with :func:`gradtx.hyperparameter` or
:func:`gradtx.option`; the transform base calls the checks below from ``__post_init__`` so a bad value
fails when the transform is built, with a message naming the transform, the argument, the value and
what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} digits)"


_F32_MAX = float(np.finfo(np.float32).max)
_I32_MAX = int(np.iinfo(np.int32).max)


def is_traced(value: Any) -> bool:
    """True for values that only exist inside a trace (``inject_hyperparams`` puts them there)."""
    return isinstance(value, jax.core.Tracer)


def is_schedule(value: Any) -> bool:
    """A schedule is any callable mapping a step count to a value."""
    return callable(value) and not isinstance(value, (numbers.Number, np.ndarray, jax.Array))


def _interval(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return "any finite real number"
    parts = []
    if low is not None:
        parts.append(f"{low} {'<' if low_open else '<='} ")
    parts.append("value")
    if high is not None:
        parts.append(f" {'<' if high_open else '<='} {high}")
    return "".join(parts)


def check_number(owner: str, name: str, value: Any, *, low=None, high=None, low_open=False,
                 high_open=False, integer=False, allow_schedule=False, allow_none=False,
                 allow_inf=False):
    """Validate one numeric hyperparameter and return it normalised to a Python scalar.

    Concrete 0-d arrays become Python floats/ints (a transform holds no arrays); tracers pass through
    unchecked (they only appear while :func:`gradtx.inject_hyperparams` rebuilds a transform inside a
    trace); schedules pass through when ``allow_schedule``.
    """
    if value is None and allow_none:
        return None
    if is_traced(value):
        return value
    if allow_schedule and is_schedule(value):
        return value
    kind = "an int" if integer else "a real number"
    if allow_schedule:
        kind += " or a schedule (a callable step -> value)"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name}={value!r} is a bool; expected {kind}.")
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"{owner}: {name} got an array of shape {value.shape} and dtype "
                            f"{value.dtype}; expected {kind} (a scalar).")
        value = value.item()
    if integer:
        if not isinstance(value, numbers.Integral):
            if isinstance(value, numbers.Real) and float(value).is_integer():
                value = int(value)
            else:
                raise TypeError(f"{owner}: {name}={value!r} is not an integer; expected {kind}.")
        value = int(value)
        if abs(value) > _I32_MAX:
            raise ValueError(f"{owner}: {name}={_short(value)} is outside the int32 range; step counts "
                             f"and sizes are used as int32 values (at most {_I32_MAX}).")
    else:
        if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name}={value!r} is complex; expected {kind}.")
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name}={value!r} has type {type(value).__name__}; "
                            f"expected {kind}.")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{owner}: {name}={_short(value)} is too large; hyperparameters are used "
                             f"as float32 values (at most {_F32_MAX:.4g} in magnitude).") from None
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise ValueError(f"{owner}: {name}={value!r} is not finite; expected "
                             f"{_interval(low, high, low_open, high_open)}.")
        if not math.isinf(value) and abs(value) > _F32_MAX:
            raise ValueError(f"{owner}: {name}={value!r} is outside the float32 range; "
                             f"hyperparameters are used as float32 values (at most {_F32_MAX:.4g} "
                             f"in magnitude).")
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected "
                         f"{_interval(low, high, low_open, high_open).replace('value', name)}.")
    return value


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {list(choices)}.")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name}={value!r} must be True or False.")
    return bool(value)


def check_dtype(owner: str, name: str, value: Any):
    """Normalise a dtype-like to its name (a hashable, readable string) or None."""
    if value is None:
        return None
    import jax.numpy as jnp
    try:
        if not isinstance(value, (str, np.dtype, type)):
            raise TypeError
        dt = jnp.dtype(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name}={value!r} is not a dtype; expected e.g. "
                        f"'float32', 'bfloat16' or None.") from None
    if not jnp.issubdtype(dt, jnp.inexact):  # np.issubdtype rejects ml_dtypes' bfloat16
        raise ValueError(f"{owner}: {name}={value!r} is not a floating-point dtype; expected e.g. "
                         f"'float32', 'bfloat16', 'float16' or None.")
    return dt.name
