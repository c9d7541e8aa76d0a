"""A gallery of every learning-rate schedule in ``gradtx.schedules``, one panel each.

    python examples/schedules.py                 # writes out/schedules/schedules.png
    python examples/schedules.py --out DIR --steps 2000

A gradtx schedule is a value: an immutable, hashable object whose ``repr`` is the call that built
it (arguments left at their defaults are not shown), so each panel's title *is* the code that makes
the curve. Any schedule can be passed wherever a learning rate is accepted, e.g.
``gradtx.adamw(learning_rate=gradtx.schedules.warmup_cosine(1e-3, 100, 900))``. The last panel
converts a PyTorch scheduler with ``gradtx.schedules.from_torch``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (selects the Agg backend before pyplot is imported)
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradtx import schedules as S  # noqa: E402


def gallery(total: int = 1000):
    """``(label, schedule)`` pairs: every schedule in ``gradtx.schedules`` over ``total`` steps."""
    t = total
    lr = 0.1
    items = [
        S.constant(lr),
        S.linear(init_value=lr, end_value=lr / 10, transition_steps=t * 6 // 10,
                 transition_begin=t // 5),
        S.polynomial(init_value=lr, end_value=lr / 100, power=2.0, transition_steps=t * 8 // 10),
        S.exponential(init_value=lr, decay_rate=0.5, transition_steps=t // 5, staircase=True,
                      end_value=lr / 20),
        S.piecewise_constant(values=(lr, lr / 2, lr / 10, lr / 100),
                             boundaries=(t // 4, t // 2, t * 3 // 4)),
        S.step_decay(init_value=lr, step_size=t * 3 // 10, factor=0.5),
        S.multistep(init_value=lr, milestones=(t // 2, t * 8 // 10), factor=0.1),
        S.cosine(init_value=lr, decay_steps=t, end_value=lr / 100),
        S.warmup_cosine(peak_value=lr, warmup_steps=t // 10, decay_steps_after_warmup=t * 9 // 10,
                        end_value=lr / 100),
        S.warmup_linear(peak_value=lr, warmup_steps=t // 10, decay_steps_after_warmup=t * 9 // 10),
        S.inverse_sqrt(peak_value=lr, warmup_steps=t // 10),
        S.warmup_stable_decay(peak_value=lr, warmup_steps=t // 20, stable_steps=t * 75 // 100,
                              decay_steps_after_stable=t // 5, decay_shape="sqrt"),
        S.one_cycle(peak_value=lr, total_steps=t, three_phase=True),
        S.cyclic(base_value=lr / 10, max_value=lr, step_size_up=t // 10, mode="triangular2"),
        S.sgdr(peak_value=lr, first_period=t // 15, period_mult=2, min_value=lr / 100),
        S.join((S.linear(0.0, lr, t // 10), S.cosine(lr, t * 4 // 10, end_value=lr / 10),
                S.constant(lr / 10)), boundaries=(t // 10, t // 2)),
    ]
    pairs = [(repr(s), s) for s in items]
    torch_call = (f'from_torch("CosineAnnealingWarmRestarts", {lr}, T_0={t // 4}, '
                  f'eta_min={lr / 100})')
    converted = S.from_torch("CosineAnnealingWarmRestarts", lr, T_0=t // 4, eta_min=lr / 100)
    pairs.append((f"{torch_call}\n= {converted!r}", converted))
    return pairs


def missing_from_gallery(pairs) -> list[str]:
    """Public schedule classes of ``gradtx.schedules`` that the gallery does not show."""
    shown = {type(s).__name__ for _, s in pairs}
    public = [n for n in S.__all__ if isinstance(getattr(S, n), type)
              and issubclass(getattr(S, n), S.Schedule) and getattr(S, n) is not S.Schedule]
    return [n for n in public if n not in shown]


USAGE = """\
Use one wherever a learning rate (or a weight
decay, a momentum) is accepted:

  lr = gradtx.schedules.warmup_cosine(
      peak_value=1e-3, warmup_steps=100,
      decay_steps_after_warmup=900)
  tx = gradtx.adamw(learning_rate=lr)

Its value at a step (a Python int or an int32
array, traced or not) is a float32 array:

  lr(0), lr(100), lr(jnp.arange(1000))
"""


def plot_gallery(path: str, total: int = 1000, dpi: int = 110) -> list[tuple[str, object]]:
    pairs = gallery(total)
    ncols = 4
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows))
    steps = jnp.arange(total + 1)
    for ax, (label, schedule) in zip(axes.ravel(), pairs):
        values = np.asarray(schedule(steps))
        ax.plot(np.asarray(steps), values, lw=1.8, color="#1f77b4")
        ax.fill_between(np.asarray(steps), values, alpha=0.12, color="#1f77b4")
        title = "\n".join(textwrap.fill(line, 52, subsequent_indent="    ")
                          for line in label.split("\n"))
        ax.set_title(title, fontsize=7.5, family="monospace", loc="left")
        ax.set_ylim(0.0, 1.08 * max(float(values.max()), 1e-12))
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    if len(pairs) < axes.size:
        axes.ravel()[len(pairs)].text(
            0.0, 0.95, USAGE, va="top", ha="left", family="monospace", fontsize=8.5,
            transform=axes.ravel()[len(pairs)].transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate", fontsize=9)
    fig.suptitle(f"gradtx.schedules: every schedule over {total} steps (title = the code that "
                 f"builds it)", fontsize=13)
    _common.save_figure(fig, path, dpi=dpi)
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "schedules"),
                        help="output folder (default: out/schedules)")
    parser.add_argument("--steps", type=int, default=1000, help="steps shown (default 1000)")
    parser.add_argument("--tiny", action="store_true", help="smaller image (tests)")
    args = parser.parse_args(argv)

    out = _common.ensure_dir(args.out)
    path = os.path.join(out, "schedules.png")
    pairs = plot_gallery(path, args.steps, dpi=70 if args.tiny else 110)
    probe = [0, args.steps // 10, args.steps // 2, args.steps]
    print(f"value at steps {probe}:")
    for label, schedule in pairs:
        values = ", ".join(f"{float(schedule(t)):.4g}" for t in probe)
        print(f"{label}\n    -> {values}")
    missing = missing_from_gallery(pairs)
    if missing:
        print(f"note: not shown in the gallery: {', '.join(missing)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
