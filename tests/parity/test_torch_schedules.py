"""gradtx.schedules.from_torch against torch.optim.lr_scheduler itself, 1,000 steps each.

Precision is tested honestly in two regimes:

* under ``jax.enable_x64`` a schedule is evaluated in float64 and rounded once to float32, so it
  must match torch (float64) to ``rtol=1e-6`` at every step;
* in the default float32 mode the same schedules must match to ``rtol=1e-6`` too, except for the
  float32 ``pow`` error of power-law decays, which grows with ``|log(value / lr)|`` (documented in
  :mod:`gradtx.schedules`): there the tolerance is ``1e-6 + 2.4e-7·|log(value / lr)|``.
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")

from gradtx import schedules  # noqa: E402

STEPS = 1000
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


def torch_lrs(name, lr, kwargs, steps=STEPS):
    """The lr torch uses for optimizer steps 0..steps-1 (optimizer.step(); scheduler.step())."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    cls = getattr(torch.optim.lr_scheduler, name)
    if name == "SequentialLR":
        subs = [getattr(torch.optim.lr_scheduler, n)(opt, **kw) for n, kw in kwargs["schedulers"]]
        sched = cls(opt, schedulers=subs, milestones=kwargs["milestones"])
    else:
        sched = cls(opt, **kwargs)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return np.asarray(out, np.float64)


def gradtx_lrs(schedule, steps=STEPS, x64=False):
    if x64:
        with jax.enable_x64(True):
            values = np.asarray(schedule(np.arange(steps)))
    else:
        values = np.asarray(schedule(np.arange(steps, dtype=np.int32)))
    assert values.dtype == np.float32
    return values.astype(np.float64)


def check(name, lr, kwargs, *, power_law=False, steps=STEPS):
    expected = torch_lrs(name, lr, kwargs, steps)
    schedule = schedules.from_torch(name, lr, **kwargs)
    scale = np.max(np.abs(expected))
    atol = 1e-12 * scale  # torch's recursions leave ~1e-17 where the exact value is 0
    got64 = gradtx_lrs(schedule, steps, x64=True)
    np.testing.assert_allclose(got64, expected, rtol=1e-6, atol=atol,
                               err_msg=f"x64: {name}({kwargs}) -> {schedule!r}")
    got32 = gradtx_lrs(schedule, steps)
    rtol = 1e-6
    if power_law:
        with np.errstate(divide="ignore"):
            rtol = 1e-6 + 2.4e-7 * np.abs(np.log(np.maximum(np.abs(expected), 1e-300) / scale))
    err = np.abs(got32 - expected)
    bad = err > atol + rtol * np.abs(expected)
    assert not bad.any(), (f"float32: {name}({kwargs}) -> {schedule!r}: first mismatch at step "
                           f"{int(np.argmax(bad))}: {got32[bad][:3]} vs {expected[bad][:3]}")


lrs = st.sampled_from([1.0, 0.1, 3e-4, 0.0123, 2.5])
gammas = st.floats(0.5, 0.999)


@SETTINGS
@given(lr=lrs, step_size=st.integers(1, 300), gamma=gammas)
def test_step_lr(lr, step_size, gamma):
    check("StepLR", lr, dict(step_size=step_size, gamma=gamma), power_law=True)


@SETTINGS
@given(lr=lrs, milestones=st.lists(st.integers(0, 1100), min_size=1, max_size=6), gamma=gammas)
def test_multistep_lr(lr, milestones, gamma):
    check("MultiStepLR", lr, dict(milestones=milestones, gamma=gamma), power_law=True)


@SETTINGS
@given(lr=lrs, gamma=st.floats(0.95, 1.0))
def test_exponential_lr(lr, gamma):
    check("ExponentialLR", lr, dict(gamma=gamma), power_law=True)


@SETTINGS
@given(lr=lrs, t_max=st.integers(1, 1500), eta_min=st.sampled_from([0.0, 1e-5, 0.01]))
def test_cosine_annealing_lr(lr, t_max, eta_min):
    check("CosineAnnealingLR", lr, dict(T_max=t_max, eta_min=eta_min))


@SETTINGS
@given(lr=lrs, t0=st.integers(1, 300), t_mult=st.integers(1, 4),
       eta_min=st.sampled_from([0.0, 1e-5, 0.01]))
def test_cosine_annealing_warm_restarts(lr, t0, t_mult, eta_min):
    check("CosineAnnealingWarmRestarts", lr, dict(T_0=t0, T_mult=t_mult, eta_min=eta_min))


@SETTINGS
@given(max_lr=st.floats(1e-3, 2.0), total=st.integers(1000, 1500), pct=st.floats(0.05, 0.45),
       anneal=st.sampled_from(["cos", "linear"]), three_phase=st.booleans(),
       div=st.floats(2.0, 50.0), final_div=st.sampled_from([10.0, 1e4]))
def test_one_cycle_lr(max_lr, total, pct, anneal, three_phase, div, final_div):
    check("OneCycleLR", 0.1, dict(max_lr=max_lr, total_steps=total, pct_start=pct,
                                  anneal_strategy=anneal, three_phase=three_phase,
                                  div_factor=div, final_div_factor=final_div))


def test_one_cycle_lr_short_run_and_epochs():
    check("OneCycleLR", 0.1, dict(max_lr=0.5, epochs=4, steps_per_epoch=25), steps=100)
    check("OneCycleLR", 0.1, dict(max_lr=0.5, total_steps=7, pct_start=0.5), steps=7)


@SETTINGS
@given(lr=lrs, start=st.floats(0.01, 1.0), end=st.floats(0.0, 1.0), total=st.integers(1, 1200))
def test_linear_lr(lr, start, end, total):
    check("LinearLR", lr, dict(start_factor=start, end_factor=end, total_iters=total))


@SETTINGS
@given(lr=lrs, total=st.integers(1, 1200), power=st.floats(0.0, 4.0))
def test_polynomial_lr(lr, total, power):
    check("PolynomialLR", lr, dict(total_iters=total, power=power))


@SETTINGS
@given(lr=lrs, factor=st.floats(0.01, 1.0), total=st.integers(1, 1200))
def test_constant_lr(lr, factor, total):
    check("ConstantLR", lr, dict(factor=factor, total_iters=total))


@SETTINGS
@given(base=st.floats(1e-4, 0.1), span=st.floats(1e-3, 1.0), up=st.integers(1, 300),
       down=st.one_of(st.none(), st.integers(1, 300)),
       mode=st.sampled_from(["triangular", "triangular2", "exp_range"]),
       gamma=st.floats(0.99, 1.0))
def test_cyclic_lr(base, span, up, down, mode, gamma):
    check("CyclicLR", 0.1, dict(base_lr=base, max_lr=base + span, step_size_up=up,
                                step_size_down=down, mode=mode, gamma=gamma),
          power_law=mode != "triangular")


def test_defaults_are_torch_defaults():
    check("LinearLR", 0.1, {})
    check("ConstantLR", 0.1, {})
    check("PolynomialLR", 0.1, {})
    check("CyclicLR", 0.1, dict(base_lr=0.01, max_lr=0.1))
    check("OneCycleLR", 0.1, dict(max_lr=0.1, total_steps=1000))


_SUB = st.one_of(
    st.builds(lambda total, start: ("LinearLR", dict(start_factor=start, total_iters=total)),
              st.integers(1, 200), st.floats(0.01, 1.0)),
    st.builds(lambda t, eta: ("CosineAnnealingLR", dict(T_max=t, eta_min=eta)),
              st.integers(1, 600), st.sampled_from([0.0, 1e-4])),
    st.builds(lambda g: ("ExponentialLR", dict(gamma=g)), st.floats(0.99, 1.0)),
    st.builds(lambda s, g: ("StepLR", dict(step_size=s, gamma=g)), st.integers(1, 100), gammas),
    st.builds(lambda f, total: ("ConstantLR", dict(factor=f, total_iters=total)),
              st.floats(0.05, 1.0), st.integers(1, 100)),
    st.builds(lambda total, p: ("PolynomialLR", dict(total_iters=total, power=p)),
              st.integers(1, 400), st.floats(0.5, 3.0)),
    st.builds(lambda t0, m: ("CosineAnnealingWarmRestarts", dict(T_0=t0, T_mult=m)),
              st.integers(1, 100), st.integers(1, 3)),
)


@SETTINGS
@given(lr=lrs, subs=st.lists(_SUB, min_size=1, max_size=4),
       gaps=st.lists(st.integers(1, 400), min_size=3, max_size=3))
def test_sequential_lr(lr, subs, gaps):
    milestones = list(np.cumsum(gaps[: len(subs) - 1]).astype(int).tolist())
    check("SequentialLR", lr, dict(schedulers=subs, milestones=milestones), power_law=True)


def test_warmup_cosine_is_torch_linear_then_cosine():
    # the documented torch equivalent of gradtx.schedules.warmup_cosine
    peak, w, d, init, end = 0.4, 37, 500, 0.004, 1e-3
    expected = torch_lrs("SequentialLR", peak, dict(
        schedulers=[("LinearLR", dict(start_factor=init / peak, total_iters=w)),
                    ("CosineAnnealingLR", dict(T_max=d, eta_min=end))], milestones=[w]),
        steps=w + d + 1)
    got = gradtx_lrs(schedules.warmup_cosine(peak, w, d, init_value=init, end_value=end),
                     steps=w + d + 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_errors_list_supported_names_and_arguments():
    with pytest.raises(ValueError, match="supported: .*CosineAnnealingLR.*StepLR"):
        schedules.from_torch("LambdaLR", 0.1, lr_lambda=None)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['gama'\].*'gamma'"):
        schedules.from_torch("StepLR", 0.1, step_size=3, gama=0.5)
    with pytest.raises(ValueError, match="needs the argument 'step_size'"):
        schedules.from_torch("StepLR", 0.1)
    with pytest.raises(ValueError, match="total_iters"):
        schedules.from_torch("LinearLR", 0.1, total_iters=0)
    with pytest.raises(ValueError, match="scale_fn"):
        schedules.from_torch("CyclicLR", 0.1, base_lr=0.1, max_lr=1.0, scale_fn=math.sqrt)
    with pytest.raises(ValueError, match="milestones"):
        schedules.from_torch("SequentialLR", 0.1, schedulers=[("StepLR", dict(step_size=2))] * 2,
                             milestones=[3, 4])
    with pytest.raises(ValueError, match="last_epoch"):
        schedules.from_torch("StepLR", 0.1, step_size=2, last_epoch=5)
    with pytest.raises(ValueError, match="epochs and steps_per_epoch"):
        schedules.from_torch("OneCycleLR", 0.1, max_lr=1.0)
