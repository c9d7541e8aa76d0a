"""What optimizers do, drawn: their paths on classic 2-D test functions.

    python examples/trajectories.py                  # writes out/trajectories/trajectories.png
    python examples/trajectories.py --gif            # ... and an animation for one function
    python examples/trajectories.py --gif --gif-function saddle --out /tmp/pics

Ten gradtx optimizers (SGD, Momentum, Nesterov, Adagrad, RMSprop, Adam, AdamW, AdaBelief, Lion,
LAMB) start from the same point on each function: Rosenbrock's curved valley, Beale's flat plateau
with steep walls, an ill-conditioned ravine (curvatures 0.1 and 10), a saddle point, and Himmelblau
(four minima). Each optimizer is a plain gradtx value; all ten run together on a function in ONE
jit-compiled ``lax.scan`` (one compilation per function, a few milliseconds per thousand steps).

What to look for:
- the ravine (curvatures 0.1 and 10): SGD, held to a small learning rate by the steep direction,
  crawls along the flat one; heavy-ball momentum gets there but overshoots and oscillates,
  Nesterov's look-ahead damps that; the adaptive methods rescale each coordinate and head
  straight for the minimum (Lion's fixed-size sign steps rattle around it);
- the saddle: SGD starting almost on the ridge takes long to leave it; sign- and
  second-moment-normalised methods (Lion, Adam, RMSprop) escape at once;
- Rosenbrock: everyone finds the valley quickly, progress along it separates them;
- AdamW's decoupled weight decay pulls toward the origin, so it settles slightly off the minimum;
- LAMB scales each step by ||params|| / ||update||: its steps shrink near the origin.

Learning rates: one value for the gradient-descent family (SGD, Momentum, Nesterov) and one for the
adaptive ones (their steps are measured in parameter units), per function, given in each panel.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (selects the Agg backend before pyplot is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

import gradtx  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Test functions. Each takes a (2,) array and returns a scalar.

def rosenbrock(p):
    x, y = p[0], p[1]
    return (1.0 - x) ** 2 + 100.0 * (y - x ** 2) ** 2


def beale(p):
    x, y = p[0], p[1]
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2
            + (2.625 - x + x * y ** 3) ** 2)


def ravine(p):
    """An ill-conditioned quadratic: curvature 0.1 along x, 10 along y (condition number 100)."""
    x, y = p[0], p[1]
    return 0.05 * x ** 2 + 5.0 * y ** 2


def saddle(p):
    """A saddle at the origin between two minima at (0, ±1): x² + y⁴/4 − y²/2."""
    x, y = p[0], p[1]
    return x ** 2 + 0.25 * y ** 4 - 0.5 * y ** 2


def himmelblau(p):
    x, y = p[0], p[1]
    return (x ** 2 + y - 11.0) ** 2 + (x + y ** 2 - 7.0) ** 2


@dataclasses.dataclass(frozen=True)
class Problem:
    title: str
    fn: Callable
    start: tuple[float, float]
    minima: tuple[tuple[float, float], ...]
    f_min: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    steps: int
    gd_lr: float          # SGD, Momentum, Nesterov
    adaptive_lr: float    # Adagrad, RMSprop, Adam, AdamW, AdaBelief, Lion, LAMB
    tol: float = 1e-3     # "converged" once f - f_min < tol


PROBLEMS = {
    "rosenbrock": Problem("Rosenbrock", rosenbrock, (-1.5, 2.2), ((1.0, 1.0),), 0.0,
                          (-2.0, 2.0), (-1.0, 3.0), 800, gd_lr=4e-4, adaptive_lr=0.05),
    "beale": Problem("Beale", beale, (0.7, 1.6), ((3.0, 0.5),), 0.0,
                     (-0.5, 4.0), (-1.5, 2.0), 800, gd_lr=5e-3, adaptive_lr=0.05),
    "ravine": Problem("Ill-conditioned ravine", ravine, (-9.0, 1.5), ((0.0, 0.0),), 0.0,
                      (-10.0, 2.0), (-2.0, 2.0), 300, gd_lr=0.12, adaptive_lr=0.2),
    "saddle": Problem("Saddle", saddle, (1.8, 1e-3), ((0.0, 1.0), (0.0, -1.0)), -0.25,
                      (-2.0, 2.0), (-1.6, 1.6), 300, gd_lr=0.05, adaptive_lr=0.05),
    "himmelblau": Problem("Himmelblau", himmelblau, (-0.35, -0.85),
                          ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186),
                           (3.584428, -1.848126)), 0.0,
                          (-5.0, 5.0), (-5.0, 5.0), 400, gd_lr=0.01, adaptive_lr=0.1),
}


def optimizers(gd_lr: float, adaptive_lr: float) -> dict[str, gradtx.Transform]:
    """The ten optimizers compared, as gradtx values (hashable: they key the jit cache)."""
    lr = adaptive_lr
    return {
        "SGD": gradtx.sgd(gd_lr),
        "Momentum": gradtx.sgd(gd_lr, momentum=0.9),
        "Nesterov": gradtx.sgd(gd_lr, momentum=0.9, nesterov=True),
        "Adagrad": gradtx.adagrad(lr * 3),      # its steps shrink as squared gradients pile up
        "RMSprop": gradtx.rmsprop(lr),
        "Adam": gradtx.adam(lr),
        "AdamW": gradtx.adamw(lr, weight_decay=0.1),
        "AdaBelief": gradtx.adabelief(lr),
        "Lion": gradtx.lion(lr / 3, weight_decay=0.0),
        "LAMB": gradtx.lamb(lr / 3),            # steps are lr * ||params||
    }


STYLES = {  # colour, line style: the gradient-descent family dashed, adaptive methods solid
    "SGD": ("#7f7f7f", "--"), "Momentum": ("#8c564b", "--"), "Nesterov": ("#e377c2", "--"),
    "Adagrad": ("#bcbd22", "-"), "RMSprop": ("#17becf", "-"), "Adam": ("#1f77b4", "-"),
    "AdamW": ("#2ca02c", "-"), "AdaBelief": ("#ff7f0e", "-"), "Lion": ("#d62728", "-"),
    "LAMB": ("#9467bd", "-"),
}


# ---------------------------------------------------------------------------------------------
# Running: all optimizers of one function in one jitted scan

@functools.partial(jax.jit, static_argnames=("fn", "txs", "steps"))
def _run(fn, txs, start, steps):
    grad_fn = jax.grad(fn)
    xs = tuple(start for _ in txs)
    states = tuple(tx.init(start) for tx in txs)

    def step(carry, _):
        xs, states = carry
        new_xs, new_states = [], []
        for tx, x, s in zip(txs, xs, states):
            u, s = tx.update(grad_fn(x), s, x)
            new_xs.append(gradtx.apply_updates(x, u))
            new_states.append(s)
        return (tuple(new_xs), tuple(new_states)), jnp.stack(new_xs)

    _, path = jax.lax.scan(step, (xs, states), None, length=steps)
    path = jnp.concatenate([jnp.broadcast_to(start, (1, len(txs), 2)), path])  # (steps+1, n, 2)
    values = jax.vmap(jax.vmap(fn))(path)
    return jnp.swapaxes(path, 0, 1), jnp.swapaxes(values, 0, 1)


@dataclasses.dataclass
class Result:
    name: str
    path: np.ndarray      # (steps + 1, 2)
    values: np.ndarray    # (steps + 1,)
    steps_to_tol: int | None
    diverged: bool


def run_problem(problem: Problem, steps: int | None = None) -> list[Result]:
    """Run every optimizer from ``problem.start``; return their paths, values and step counts."""
    steps = problem.steps if steps is None else steps
    txs = optimizers(problem.gd_lr, problem.adaptive_lr)
    start = jnp.asarray(problem.start, dtype=jnp.float32)
    paths, values = _run(problem.fn, tuple(txs.values()), start, steps)
    paths, values = np.asarray(paths), np.asarray(values)
    results = []
    for name, path, vals in zip(txs, paths, values):
        finite = np.isfinite(vals) & np.all(np.isfinite(path), axis=1)
        diverged = not finite.all() or np.abs(path).max() > 1e6
        hit = np.nonzero(finite & (vals - problem.f_min < problem.tol))[0]
        results.append(Result(name, path, vals, int(hit[0]) if len(hit) else None, diverged))
    return results


# ---------------------------------------------------------------------------------------------
# Drawing

def _contours(ax, problem: Problem, resolution: int):
    xs = np.linspace(*problem.xlim, resolution)
    ys = np.linspace(*problem.ylim, resolution)
    X, Y = np.meshgrid(xs, ys)
    Z = np.asarray(problem.fn(np.stack([X, Y]))) - problem.f_min
    Z = np.maximum(Z, 1e-4)
    levels = np.logspace(np.log10(max(Z.min(), 1e-4)), np.log10(Z.max()), 24)
    ax.contourf(X, Y, Z, levels=levels, norm=LogNorm(), cmap="Blues_r", alpha=0.55)
    ax.contour(X, Y, Z, levels=levels[::2], norm=LogNorm(), colors="k", linewidths=0.3,
               alpha=0.35)
    for mx, my in problem.minima:
        ax.plot(mx, my, marker="*", ms=13, color="gold", mec="k", mew=0.8, zorder=5)
    ax.plot(*problem.start, marker="o", ms=7, color="white", mec="k", mew=1.2, zorder=5)
    ax.set_xlim(problem.xlim)
    ax.set_ylim(problem.ylim)


def _panel_title(problem: Problem, steps: int) -> str:
    return (f"{problem.title}  ({steps} steps)\n"
            f"lr: GD family {problem.gd_lr:g}, adaptive {problem.adaptive_lr:g}")


def _draw_paths(ax, results: list[Result], upto: int | None = None):
    lines = {}
    for r in results:
        color, ls = STYLES[r.name]
        path = r.path if upto is None else r.path[:upto + 1]
        path = path[np.all(np.isfinite(path), axis=1)]
        (line,) = ax.plot(path[:, 0], path[:, 1], ls, color=color, lw=1.6, alpha=0.9,
                          zorder=3 if ls == "--" else 2)
        ax.plot(path[-1, 0], path[-1, 1], "o", color=color, ms=4, mec="k", mew=0.4)
        lines[r.name] = line
    return lines


def _step_label(r: Result, f_min: float) -> str:
    if r.diverged:
        return "diverged"
    if r.steps_to_tol is not None:
        return f"{r.steps_to_tol}"
    return f"({r.values[-1] - f_min:.0e})"


def plot_trajectories(out_path: str, names=None, steps_scale: float = 1.0,
                      resolution: int = 300, verbose: bool = True) -> dict[str, list[Result]]:
    """Draw every problem's paths (one panel each) plus a step-count table into ``out_path``.

    ``steps_scale`` shortens every run (``--tiny`` uses it). Returns the results per problem.
    """
    names = list(PROBLEMS) if names is None else list(names)
    all_results = {}
    ncols = 3
    nrows = -(-(len(names) + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 5.0 * nrows))
    axes = np.atleast_1d(axes).ravel()
    lines = {}
    for ax, name in zip(axes, names):
        problem = PROBLEMS[name]
        steps = max(2, int(round(problem.steps * steps_scale)))
        t0 = time.perf_counter()
        results = run_problem(problem, steps)
        if verbose:
            print(f"  {problem.title:<24} {len(results)} optimizers x {steps} steps: "
                  f"{time.perf_counter() - t0:.2f} s (including compilation)")
        all_results[name] = results
        _contours(ax, problem, resolution)
        lines = _draw_paths(ax, results)
        ax.set_title(_panel_title(problem, steps), fontsize=11)
        ax.set_xlabel("x")
        ax.set_ylabel("y")

    # The last panel: the legend, and for each function the steps each optimizer needed to get
    # within tol of the minimum value ("—" = not within the steps shown, with its final gap).
    table_ax = axes[len(names)]
    table_ax.axis("off")
    for ax in axes[len(names) + 1:]:
        ax.axis("off")
    opt_names = [r.name for r in next(iter(all_results.values()))]
    cells = [[_step_label(all_results[n][i], PROBLEMS[n].f_min) for n in names]
             for i in range(len(opt_names))]
    col_labels = [PROBLEMS[n].title.split()[-1].capitalize() for n in names]
    table = table_ax.table(cellText=cells, rowLabels=opt_names, colLabels=col_labels,
                           loc="upper center", cellLoc="center", bbox=[0.2, 0.28, 0.8, 0.62])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for i, opt in enumerate(opt_names):
        cell = table[i + 1, -1]
        cell.get_text().set_color(STYLES[opt][0])
        cell.get_text().set_fontweight("bold")
    table_ax.set_title(f"steps until f − f* < tol  (tol = {PROBLEMS[names[0]].tol:g})",
                       fontsize=11)
    table_ax.legend(list(lines.values()), list(lines.keys()), loc="lower center", ncol=5,
                    fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02), handlelength=2.2)
    table_ax.text(0.5, 0.2, "(x): not within tol; x = f − f* after the last step\n"
                  "○ start   ★ minimum   • end point", ha="center", va="center",
                  transform=table_ax.transAxes, fontsize=9)
    fig.suptitle("gradtx optimizers on 2-D test functions", fontsize=15)
    _common.save_figure(fig, out_path)
    return all_results


def write_gif(out_path: str, name: str = "rosenbrock", steps_scale: float = 1.0,
              frames: int = 60, resolution: int = 200, fps: int = 12) -> None:
    """Animate the optimizers' paths on one function into a GIF (matplotlib + Pillow)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    problem = PROBLEMS[name]
    steps = max(2, int(round(problem.steps * steps_scale)))
    results = run_problem(problem, steps)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    frame_steps = np.unique(np.linspace(0, steps, frames).round().astype(int))
    _contours(ax, problem, resolution)        # drawn once; each frame only moves the paths
    artists = []
    for r in results:
        color, ls = STYLES[r.name]
        (line,) = ax.plot([], [], ls, color=color, lw=1.6, alpha=0.9, label=r.name,
                          zorder=3 if ls == "--" else 2)
        (head,) = ax.plot([], [], "o", color=color, ms=5, mec="k", mew=0.5, zorder=4)
        artists.append((r, line, head))
    ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.8)
    title = ax.set_title(f"{problem.title}: step 0 / {steps}")
    fig.tight_layout()

    def draw(k):
        upto = int(frame_steps[k])
        for r, line, head in artists:
            path = r.path[:upto + 1]
            path = path[np.all(np.isfinite(path), axis=1)]
            line.set_data(path[:, 0], path[:, 1])
            head.set_data(path[-1:, 0], path[-1:, 1])
        title.set_text(f"{problem.title}: step {upto} / {steps}")
        return []

    anim = FuncAnimation(fig, draw, frames=len(frame_steps), blit=False)
    anim.save(out_path, writer=PillowWriter(fps=fps))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "trajectories"),
                        help="output folder (default: out/trajectories)")
    parser.add_argument("--tiny", action="store_true", help="few steps, coarse contours (tests)")
    parser.add_argument("--gif", action="store_true", help="also write an animation (GIF)")
    parser.add_argument("--gif-function", default="rosenbrock", choices=sorted(PROBLEMS))
    args = parser.parse_args(argv)

    out = _common.ensure_dir(args.out)
    scale, resolution = (0.1, 60) if args.tiny else (1.0, 300)
    png = os.path.join(out, "trajectories.png")
    print("Running 10 optimizers on 5 functions (one jitted scan per function):")
    plot_trajectories(png, steps_scale=scale, resolution=resolution)
    print(f"wrote {png}")
    if args.gif:
        gif = os.path.join(out, f"trajectories_{args.gif_function}.gif")
        write_gif(gif, args.gif_function, steps_scale=scale, frames=8 if args.tiny else 60,
                  resolution=40 if args.tiny else 200)
        print(f"wrote {gif}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
