"""Schedule laws, over random arguments, for every schedule in gradtx.schedules:

* exact at the named boundary steps (the value there is the float32 rounding of the argument);
* monotone on each monotone phase (non-strictly, in the direction its end points give);
* continuous where the definition is continuous: one step changes the value by at most the
  definition's largest slope (plus float32 rounding), phase boundaries included; the designed
  jumps (restarts, staircases, milestones) are the only exceptions.

Each example evaluates the schedule once on a vector of steps (one compilation per example).
"""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from gradtx import schedules as S

# XLA on CPU flushes float32 subnormals to zero, so values below the smallest normal float32 are
# drawn as 0 (a schedule cannot hold a subnormal learning rate on this backend)
value = st.floats(-3.0, 3.0).map(lambda v: 0.0 if abs(v) < 1e-30 else v)
nonneg = st.floats(0.0, 3.0).map(lambda v: 0.0 if v < 1e-30 else v)
length = st.integers(1, 12)


def case(schedule, *, exact=(), phases=(), slope=None, jumps=(), horizon=40):
    """``exact``: (step, value); ``phases``: (start, end, +1/-1) inclusive step ranges;
    ``slope``: max |s(t+1) - s(t)| where continuous; ``jumps``: steps t with a designed jump
    between t - 1 and t."""
    return dict(schedule=schedule, exact=exact, phases=phases, slope=slope, jumps=set(jumps),
                horizon=horizon)


def _dir(a, b):
    return 1 if b >= a else -1


@st.composite
def cases(draw):
    kind = draw(st.sampled_from([
        "constant", "linear", "polynomial", "exponential", "piecewise_constant", "step_decay",
        "multistep", "cosine", "warmup_cosine", "warmup_linear", "inverse_sqrt",
        "warmup_stable_decay", "one_cycle", "cyclic", "sgdr", "join"]))
    if kind == "constant":
        v = draw(value)
        return case(S.constant(v), exact=[(0, v), (17, v)], phases=[(0, 40, 1), (0, 40, -1)],
                    slope=0.0)
    if kind == "linear":
        a, b, n, begin = draw(value), draw(value), draw(length), draw(st.integers(0, 5))
        return case(S.linear(a, b, n, begin), exact=[(0, a), (begin, a), (begin + n, b),
                                                     (begin + n + 7, b)],
                    phases=[(0, 40, _dir(a, b))], slope=abs(b - a) / n)
    if kind == "polynomial":
        a, b, n, p = draw(value), draw(value), draw(length), draw(st.floats(0.25, 4.0))
        bound = abs(b - a) * (p / n if p >= 1 else n ** -p)
        return case(S.polynomial(a, b, p, n), exact=[(0, a), (n, b), (n + 3, b)],
                    phases=[(0, 40, _dir(a, b))], slope=bound)
    if kind == "exponential":
        a, r, n = draw(nonneg), draw(st.floats(0.2, 0.99)), draw(length)
        stair = draw(st.booleans())
        return case(S.exponential(a, r, n, staircase=stair), exact=[(0, a)],
                    phases=[(0, 40, -1)], slope=None if stair else a * (1 - r ** (1 / n)),
                    jumps=range(n, 41, n) if stair else ())
    if kind == "piecewise_constant":
        bounds = sorted(set(draw(st.lists(st.integers(1, 30), min_size=0, max_size=4))))
        vals = draw(st.lists(value, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
        exact = [(0, vals[0])] + [(b, v) for b, v in zip(bounds, vals[1:])] + \
                [(b - 1, v) for b, v in zip(bounds, vals)]
        return case(S.piecewise_constant(tuple(vals), tuple(bounds)), exact=exact, slope=0.0,
                    jumps=bounds)
    if kind == "step_decay":
        a, n, f = draw(nonneg), draw(length), draw(st.floats(0.0, 1.0))
        return case(S.step_decay(a, n, f), exact=[(0, a), (n - 1, a)], phases=[(0, 40, -1)],
                    slope=0.0, jumps=range(n, 41, n))
    if kind == "multistep":
        ms = tuple(sorted(draw(st.lists(st.integers(0, 30), min_size=1, max_size=4))))
        a, f = draw(nonneg), draw(st.floats(0.0, 1.0))
        return case(S.multistep(a, ms, f), exact=[(ms[0] - 1, a)] if ms[0] > 0 else [],
                    phases=[(0, 40, -1)], slope=0.0, jumps=ms)
    if kind == "cosine":
        a, b, n = draw(value), draw(value), draw(length)
        e = draw(st.floats(1.0, 3.0))
        return case(S.cosine(a, n, b, exponent=e), exact=[(0, a), (n, b), (n + 5, b)],
                    phases=[(0, 40, _dir(a, b))], slope=abs(a - b) * e * math.pi / (2 * n))
    if kind in ("warmup_cosine", "warmup_linear"):
        peak, init, end = draw(value), draw(value), draw(value)
        w, d = draw(st.integers(0, 10)), draw(length)
        cls = S.warmup_cosine if kind == "warmup_cosine" else S.warmup_linear
        decay_slope = abs(peak - end) / d * (math.pi / 2 if kind == "warmup_cosine" else 1.0)
        return case(cls(peak, w, d, init_value=init, end_value=end),
                    exact=[(0, init if w else peak), (w, peak), (w + d, end), (w + d + 4, end)],
                    phases=[(0, w, _dir(init, peak)), (w, 40, _dir(peak, end))],
                    slope=max(abs(peak - init) / max(w, 1), decay_slope))
    if kind == "inverse_sqrt":
        peak, init, w = draw(nonneg), draw(nonneg), draw(st.integers(1, 10))
        tau = draw(st.one_of(st.none(), st.floats(0.5, 20.0)))
        t_eff = max(w, 1) if tau is None else tau
        return case(S.inverse_sqrt(peak, w, tau, init_value=init),
                    exact=[(0, init), (w, peak)],
                    phases=[(0, w, _dir(init, peak)), (w, 40, -1)],
                    slope=max(abs(peak - init) / w, peak / (2 * t_eff)))
    if kind == "warmup_stable_decay":
        peak, init, end = draw(value), draw(value), draw(value)
        w, s, d = draw(st.integers(0, 8)), draw(st.integers(0, 8)), draw(length)
        shape = draw(st.sampled_from(["linear", "cosine", "sqrt"]))
        decay_slope = abs(peak - end) * {"linear": 1 / d, "cosine": math.pi / (2 * d),
                                         "sqrt": 1 / math.sqrt(d)}[shape]
        return case(S.warmup_stable_decay(peak, w, s, d, init_value=init, end_value=end,
                                          decay_shape=shape),
                    exact=[(0, init if w else peak), (w, peak), (w + s, peak), (w + s + d, end),
                           (w + s + d + 3, end)],
                    phases=[(0, w, _dir(init, peak)), (w, w + s, 1), (w, w + s, -1),
                            (w + s, 40, _dir(peak, end))],
                    slope=max(abs(peak - init) / max(w, 1), decay_slope))
    if kind == "one_cycle":
        peak, total = draw(st.floats(0.1, 3.0)), draw(st.integers(10, 40))
        # pct·total > 1: a warm-up phase with no step is rejected at construction (torch divides
        # by zero there)
        pct, div = draw(st.floats(1.05 / total, 0.9)), draw(st.floats(1.5, 30.0))
        fdiv = draw(st.floats(1.5, 1e4))
        anneal = draw(st.sampled_from(["cos", "linear"]))
        init, final = peak / div, peak / div / fdiv
        e1 = pct * total - 1
        exact = [(0, init), (total - 1, final), (total + 3, final)]
        if float(e1).is_integer():
            exact.append((int(e1), peak))
        up_end = math.floor(e1)
        lengths = (e1, total - 1 - e1)
        k = math.pi / 2 if anneal == "cos" else 1.0
        slope = max((peak - init) * k / lengths[0] if lengths[0] >= 1 else peak,
                    (peak - final) * k / lengths[1] if lengths[1] >= 1 else peak)
        return case(S.one_cycle(peak, total, pct, div, fdiv, anneal=anneal), exact=exact,
                    phases=[(0, up_end, 1), (math.ceil(e1), 40, -1)], slope=slope)
    if kind == "cyclic":
        base, mx = draw(value), draw(value)
        up, down = draw(length), draw(st.one_of(st.none(), length))
        dn = up if down is None else down
        mode = draw(st.sampled_from(["triangular", "triangular2", "exp_range"]))
        gamma = draw(st.floats(0.9, 1.0)) if mode == "exp_range" else 1.0
        slope = abs(mx - base) * (1 / min(up, dn) + (1 - gamma))
        return case(S.cyclic(base, mx, up, down, mode=mode, gamma=gamma),
                    exact=[(0, base), (up + dn, base)] + ([(up, mx)] if mode == "triangular"
                                                          else []),
                    phases=[(0, up, _dir(base, mx)), (up, up + dn, _dir(mx, base))],
                    slope=slope)
    if kind == "sgdr":
        peak, lo = draw(nonneg), draw(nonneg)
        t0, mult = draw(st.integers(1, 8)), draw(st.integers(1, 3))
        starts, period, s = [0], t0, 0
        while s + period <= 40:
            s += period
            starts.append(s)
            period *= mult
        phases = [(a, b - 1, _dir(peak, lo)) for a, b in zip(starts, starts[1:])]
        return case(S.sgdr(peak, t0, mult, lo), exact=[(s, peak) for s in starts],
                    phases=phases, slope=abs(peak - lo) * math.pi / (2 * t0), jumps=starts[1:])
    # join: a warm-up then a cosine; exact at the joint, continuous if the pieces meet
    peak, w, d = draw(nonneg), draw(length), draw(length)
    s = S.join((S.linear(0.0, peak, w), S.cosine(peak, d)), boundaries=(w,))
    return case(s, exact=[(0, 0.0), (w, peak), (w + d, 0.0)],
                phases=[(0, w, 1), (w, 40, -1)], slope=max(peak / w, peak * math.pi / (2 * d)))


@settings(max_examples=60, deadline=None)
@given(c=cases())
def test_schedule_laws(c):
    s, horizon = c["schedule"], c["horizon"]
    steps = np.arange(horizon + 1)
    values = np.asarray(s(steps), np.float64)
    assert values.dtype == np.float64 and np.all(np.isfinite(values))
    # exact at the named boundaries: the float32 rounding of the argument
    for t, want in c["exact"]:
        got = float(np.asarray(s(t)))
        assert got == float(np.float32(want)), f"{s!r} at step {t}: {got} != {want}"
        if t <= horizon:
            assert values[t] == got, f"{s!r}: vector and scalar evaluation differ at {t}"
    # monotone on monotone phases (float32 rounding may not reverse the order)
    for start, end, direction in c["phases"]:
        seg = values[max(start, 0):min(end, horizon) + 1]
        diffs = np.diff(seg) * direction
        assert np.all(diffs >= 0), f"{s!r} is not monotone on [{start}, {end}]: {seg}"
    # continuous where the definition is: bounded one-step changes except at designed jumps
    if c["slope"] is not None:
        scale = max(1.0, float(np.max(np.abs(values))))
        for t in range(1, horizon + 1):
            if t in c["jumps"]:
                continue
            jump = abs(values[t] - values[t - 1])
            assert jump <= c["slope"] * (1 + 1e-5) + 4e-7 * scale, \
                f"{s!r}: |s({t}) - s({t - 1})| = {jump} > {c['slope']}"
