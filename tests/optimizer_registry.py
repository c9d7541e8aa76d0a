"""The registry of optimizers under test: one entry per optimizer, with capability flags.

Every conformance test (tests/test_conformance.py) is parametrised over ``ENTRIES`` and reads only
the fields below: there are no name-based special cases in the suite. To put a new optimizer under
test, add an :class:`Entry` with

* ``build``: the alias (or any factory returning a transform), called as ``build(**kwargs)``;
* ``kwargs``: arguments tuned so that it converges on both test problems within their budgets;
* ``explicit``: a factory taking the same ``kwargs`` and returning the explicit chain of public
  primitives that the alias's docstring names (``alias(**kw) == explicit(**kw)`` by value);
* capability flags (``needs_params``, ``supports_bf16_convergence``, ``sign_based``, ``factored``)
  and ``cpu_step_temporaries``/``cpu_bf16_step_temporaries`` (parameter-sized buffers its
  compiled CPU step may write besides the outputs, float32/bfloat16 parameters; 0 unless the
  math forces one);
* ``budgets``: per problem, the step budget, the float32 tolerance, the bfloat16 tolerance (``None``
  when not expected to converge in bfloat16) and per-problem overrides of ``kwargs``.

The test problems (``PROBLEMS``) are here too, so that budgets and problems are read together.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

import gradtx


# ---------------------------------------------------------------------------------------------
# Schedules used by the registry: hashable values with a readable repr (like gradtx's own).

@dataclasses.dataclass(frozen=True)
class ExponentialDecay:
    """``value · rate**step`` in float32 (a test-local schedule)."""

    value: float
    rate: float

    def __call__(self, step):
        t = jnp.asarray(step, jnp.float32)
        return jnp.asarray(self.value, jnp.float32) * jnp.power(jnp.float32(self.rate), t)


def label_by_rank(params):
    """Labels for ``partition``: 'matrix' for leaves of rank >= 2, else 'vector'."""
    return jax.tree.map(lambda p: "matrix" if len(jnp.shape(p)) >= 2 else "vector", params)


def select_matrices(params):
    """A decay mask: decay only leaves of rank >= 2."""
    return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)


#: Names that ``repr`` of a registry optimizer may mention besides gradtx's (for round trips).
REPR_NAMESPACE = {"ExponentialDecay": ExponentialDecay, "label_by_rank": label_by_rank,
                  "select_matrices": select_matrices, "float": float}


# ---------------------------------------------------------------------------------------------
# Problems

_QC_W = (0.5, 1.0, 1.5, 2.0)
_QT_W = (1.0, -0.5, 0.25, 2.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    init: Callable[[Any], Any]          # dtype -> params
    loss: Callable[[Any], jax.Array]    # params -> float32 loss (computes in float32)
    solution: Callable[[], Any]         # float32 minimiser with the params' structure


def _quadratic_consts():
    c_w = jnp.asarray(_QC_W, jnp.float32)
    t_w = jnp.asarray(_QT_W, jnp.float32)
    c_m = jnp.linspace(0.5, 2.0, 12, dtype=jnp.float32).reshape(3, 4)
    t_m = jnp.linspace(-1.5, 1.5, 12, dtype=jnp.float32).reshape(3, 4)
    return c_w, t_w, c_m, t_m


def _quadratic_loss(params):
    c_w, t_w, c_m, t_m = _quadratic_consts()
    w = params["w"].astype(jnp.float32)
    m = params["m"].astype(jnp.float32)
    return 0.5 * jnp.sum(c_w * (w - t_w) ** 2) + 0.5 * jnp.sum(c_m * (m - t_m) ** 2)


def _rosenbrock_loss(params):
    x = params["xy"].astype(jnp.float32)
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


PROBLEMS = {
    # An ill-conditioned (4x) separable quadratic over a tree with a vector and a matrix leaf.
    "quadratic": Problem(
        "quadratic",
        init=lambda dtype: {"w": jnp.full((4,), 0.5, dtype), "m": jnp.full((3, 4), 0.5, dtype)},
        loss=_quadratic_loss,
        solution=lambda: {"w": _quadratic_consts()[1], "m": _quadratic_consts()[3]}),
    # The 2-D Rosenbrock function from the origin; minimum at (1, 1).
    "rosenbrock": Problem(
        "rosenbrock",
        init=lambda dtype: {"xy": jnp.zeros((2,), dtype)},
        loss=_rosenbrock_loss,
        solution=lambda: {"xy": jnp.ones((2,), jnp.float32)}),
}


# ---------------------------------------------------------------------------------------------
# Entries

@dataclasses.dataclass(frozen=True)
class Budget:
    """How an entry is expected to do on one problem."""

    steps: int
    tol: float                         # max |p - p*| after ``steps``, float32 parameters
    bf16_tol: float | None = None      # same for bfloat16 parameters; None: not checked
    overrides: tuple = ()              # (name, value) pairs overriding Entry.kwargs


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    kwargs: Mapping[str, Any]
    explicit: Callable[..., Any]
    budgets: Mapping[str, Budget]
    needs_params: bool = False
    supports_bf16_convergence: bool = True
    sign_based: bool = False
    factored: bool = False
    # Parameter-sized buffers, other than the outputs, that XLA's CPU backend writes in the donated
    # step of one matrix leaf (temporaries and copies; each costs a pass and fresh-page faults).
    # Nonzero only where the math forces it; the reason is given at the entry.
    cpu_step_temporaries: int = 0
    # The same for bfloat16 parameters (bfloat16 state by default), counting bfloat16 buffers: a
    # moment stored in bfloat16 is read back as stored (numerics.as_stored), so no state primitive
    # copies its donated moment; nonzero only where the entry says why.
    cpu_bf16_step_temporaries: int = 0

    def config(self, problem: str | None = None) -> dict:
        kw = dict(self.kwargs)
        if problem is not None:
            kw.update(dict(self.budgets[problem].overrides))
        return kw

    def make(self, problem: str | None = None):
        return self.build(**self.config(problem))

    def make_explicit(self, problem: str | None = None):
        return self.explicit(**self.config(problem))

    def __repr__(self):
        return f"Entry({self.name})"


def _b(steps, tol, bf16_tol=None, **overrides):
    return Budget(steps, tol, bf16_tol, tuple(sorted(overrides.items())))


g = gradtx


def _decay(weight_decay, mask=None):
    return (g.add_decoupled_weight_decay(weight_decay, mask=mask),) if weight_decay else ()


ENTRIES: list[Entry] = [
    Entry(
        "sgd", g.sgd, dict(learning_rate=0.1),
        lambda learning_rate: g.chain(g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(300, 1e-4, 0.1), "rosenbrock": _b(20000, 2e-3, None, learning_rate=1e-3)},
        supports_bf16_convergence=True),
    Entry(
        "sgd_momentum", g.sgd, dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-5),
        lambda learning_rate, momentum, weight_decay: g.chain(
            g.add_decoupled_weight_decay(weight_decay), g.trace(momentum),
            g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(300, 1e-3, 0.05), "rosenbrock": _b(3000, 2e-3, 0.1, learning_rate=3e-3)},
        needs_params=True),
    Entry(
        "sgd_nesterov_dampening", g.sgd,
        dict(learning_rate=0.05, momentum=0.9, nesterov=True, dampening=0.1),
        lambda learning_rate, momentum, nesterov, dampening: g.chain(
            g.trace(momentum, nesterov=nesterov, dampening=dampening),
            g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(300, 1e-4, 0.05), "rosenbrock": _b(3000, 2e-3, None, learning_rate=1e-3)}),
    Entry(
        "adagrad", g.adagrad, dict(learning_rate=0.5),
        lambda learning_rate: g.chain(g.scale_by_rss(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(500, 1e-4, 0.05), "rosenbrock": _b(5000, 2e-2, None, learning_rate=0.03)}),
    Entry(
        "adadelta", g.adadelta, dict(learning_rate=1.0, rho=0.9),
        lambda learning_rate, rho: g.chain(g.scale_by_adadelta(rho=rho),
                                           g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 1e-3, 0.05),
         "rosenbrock": _b(5000, 1e-2, None, learning_rate=ExponentialDecay(1.0, 0.9995))},
        cpu_step_temporaries=1,    # √(x + ε) of the old x, which the step overwrites
        cpu_bf16_step_temporaries=1),   # there a copy of x: the update reads the old x
    Entry(
        "rmsprop", g.rmsprop, dict(learning_rate=ExponentialDecay(0.01, 0.999)),
        lambda learning_rate: g.chain(g.scale_by_rms(decay=0.9, eps_in_sqrt=True),
                                      g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 1e-3, 0.05), "rosenbrock": _b(3000, 3e-2, None)}),
    Entry(
        "rmsprop_centered", g.rmsprop,
        dict(learning_rate=ExponentialDecay(0.01, 0.998), centered=True),
        lambda learning_rate, centered: g.chain(
            g.scale_by_stddev(decay=0.9, eps_in_sqrt=True), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 1e-3, 0.05), "rosenbrock": _b(3000, 3e-2, None)}),
    Entry(
        "adam", g.adam, dict(learning_rate=0.1),
        lambda learning_rate: g.chain(g.scale_by_adam(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.1),
         "rosenbrock": _b(3000, 2e-3, 0.05, learning_rate=ExponentialDecay(0.1, 0.999))}),
    Entry(
        "adamw", g.adamw, dict(learning_rate=0.1, weight_decay=1e-4),
        lambda learning_rate, weight_decay: g.chain(
            g.scale_by_adam(), g.add_decoupled_weight_decay(weight_decay),
            g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 2e-3, 0.1), "rosenbrock": _b(3000, 3e-3, 0.05)},
        needs_params=True),
    Entry(
        "nadam", g.nadam, dict(learning_rate=ExponentialDecay(0.1, 0.999)),
        lambda learning_rate: g.chain(g.scale_by_adam(nesterov=True),
                                      g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.1), "rosenbrock": _b(3000, 2e-3, 0.15)}),
    Entry(
        "nadamw", g.nadamw, dict(learning_rate=ExponentialDecay(0.1, 0.999), weight_decay=1e-4),
        lambda learning_rate, weight_decay: g.chain(
            g.scale_by_adam(nesterov=True), g.add_decoupled_weight_decay(weight_decay),
            g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 2e-3, 0.1), "rosenbrock": _b(3000, 3e-3, 0.15)},
        needs_params=True),
    Entry(
        "amsgrad", g.amsgrad, dict(learning_rate=0.1),
        lambda learning_rate: g.chain(g.scale_by_adam(amsgrad=True),
                                      g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.1), "rosenbrock": _b(3000, 5e-3, 0.1)}),
    Entry(
        "radam", g.radam, dict(learning_rate=0.03),
        lambda learning_rate: g.chain(g.scale_by_radam(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.2), "rosenbrock": _b(3000, 5e-3, None, learning_rate=3e-3)}),
    Entry(
        "adamax", g.adamax, dict(learning_rate=0.1),
        lambda learning_rate: g.chain(g.scale_by_adamax(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.1), "rosenbrock": _b(5000, 2e-2, None)}),
    Entry(
        "adabelief", g.adabelief, dict(learning_rate=0.05),
        lambda learning_rate: g.chain(g.scale_by_belief(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(1000, 1e-3, 0.05), "rosenbrock": _b(3000, 2e-3, 0.1)}),
    Entry(
        "lamb", g.lamb, dict(learning_rate=ExponentialDecay(0.1, 0.998), weight_decay=1e-4),
        lambda learning_rate, weight_decay: g.chain(
            g.scale_by_adam(eps=1e-6), g.add_decoupled_weight_decay(weight_decay),
            g.scale_by_trust_ratio(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 2e-3, 0.05), "rosenbrock": _b(3000, 5e-3, 0.05)},
        # ‖u‖ is recomputed from the new moments (chain replay; bf16 moments too): no temporary
        needs_params=True),
    Entry(
        "lars", g.lars, dict(learning_rate=ExponentialDecay(1.0, 0.998), trust_coefficient=0.01),
        lambda learning_rate, trust_coefficient: g.chain(
            g.scale_by_trust_ratio(trust_coefficient=trust_coefficient, form="lars"),
            g.trace(0.9), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 3e-3, 0.05), "rosenbrock": _b(3000, 5e-3, 0.05)},
        needs_params=True),
    Entry(
        "lion", g.lion, dict(learning_rate=ExponentialDecay(0.01, 0.998), weight_decay=1e-4),
        lambda learning_rate, weight_decay: g.chain(
            g.scale_by_lion(), g.add_decoupled_weight_decay(weight_decay),
            g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 2e-3, 0.05), "rosenbrock": _b(3000, 5e-3, 0.1)},
        needs_params=True, sign_based=True,    # no copy of m: the direction reads the new m
        cpu_bf16_step_temporaries=1),   # bf16 m is rounded: the direction reads the old m
    Entry(
        "sign_sgd", g.sign_sgd, dict(learning_rate=ExponentialDecay(0.01, 0.999)),
        lambda learning_rate: g.chain(g.scale_by_sign(), g.scale_by_learning_rate(learning_rate)),
        {"quadratic": _b(3000, 1e-3, 0.05),
         "rosenbrock": _b(3000, 1e-2, None, learning_rate=ExponentialDecay(1.0, 0.998))},
        sign_based=True),
]


# Composed optimizers: chains of aliases and combinators, built the way users build their own.

def clipped_adamw(learning_rate, max_norm, weight_decay):
    """Global-norm clipping in front of AdamW (a nested chain)."""
    return g.chain(g.clip_by_global_norm(max_norm),
                   g.adamw(learning_rate, weight_decay=weight_decay))


def clipped_adamw_explicit(learning_rate, max_norm, weight_decay):
    return g.chain(g.clip_by_global_norm(max_norm),
                   g.chain(g.scale_by_adam(), g.add_decoupled_weight_decay(weight_decay),
                           g.scale_by_learning_rate(learning_rate)))


def lamb_for_matrices(learning_rate, vector_learning_rate):
    """LAMB for matrices, Adam for vectors (partition by rank)."""
    return g.partition({"matrix": g.lamb(learning_rate), "vector": g.adam(vector_learning_rate)},
                       label_by_rank)


def lamb_for_matrices_explicit(learning_rate, vector_learning_rate):
    return g.partition(
        {"matrix": g.chain(g.scale_by_adam(eps=1e-6), g.scale_by_trust_ratio(),
                           g.scale_by_learning_rate(learning_rate)),
         "vector": g.chain(g.scale_by_adam(), g.scale_by_learning_rate(vector_learning_rate))},
        label_by_rank)


def masked_decay_momentum(learning_rate, weight_decay):
    """Element-wise clipping, decay of matrices only, heavy-ball momentum (a named chain)."""
    return g.named_chain(
        ("clip", g.clip(10.0)),
        ("decay", g.masked(g.add_decoupled_weight_decay(weight_decay), select_matrices)),
        ("momentum", g.trace(0.9)),
        ("lr", g.scale_by_learning_rate(learning_rate)))


def _adafactor_explicit(learning_rate, min_dim_size_to_factor, multiply_by_parameter_scale=True):
    return g.chain(g.scale_by_factored_rms(min_dim_size_to_factor=min_dim_size_to_factor),
                   *((g.scale_by_param_block_rms(),) if multiply_by_parameter_scale else ()),
                   g.scale_by_learning_rate(learning_rate))


ENTRIES += [
    Entry(
        "adafactor", g.adafactor,
        dict(learning_rate=ExponentialDecay(0.05, 0.999), min_dim_size_to_factor=2),
        _adafactor_explicit,
        {"quadratic": _b(3000, 2e-3, 0.05),
         "rosenbrock": _b(3000, 3e-2, None, multiply_by_parameter_scale=False,
                           learning_rate=ExponentialDecay(0.01, 0.999))},
        needs_params=True, factored=True),
    Entry(
        "clipped_adamw", clipped_adamw, dict(learning_rate=0.1, max_norm=1.0, weight_decay=1e-4),
        clipped_adamw_explicit,
        {"quadratic": _b(1000, 2e-3, 0.1),
         "rosenbrock": _b(3000, 2e-2, 0.1, learning_rate=ExponentialDecay(0.1, 0.999))},
        needs_params=True,
        cpu_bf16_step_temporaries=1),   # bf16: the clipped gradient, read by both moments
    Entry(
        "partition_lamb_adam", lamb_for_matrices,
        dict(learning_rate=ExponentialDecay(0.1, 0.998), vector_learning_rate=0.1),
        lamb_for_matrices_explicit,
        {"quadratic": _b(2000, 2e-3, 0.1, learning_rate=ExponentialDecay(0.1, 0.997),
                         vector_learning_rate=ExponentialDecay(0.1, 0.998)),
         "rosenbrock": _b(3000, 2e-3, 0.05, vector_learning_rate=ExponentialDecay(0.1, 0.999))},
        needs_params=True),
    Entry(
        "named_masked_momentum", masked_decay_momentum, dict(learning_rate=0.05, weight_decay=1e-5),
        masked_decay_momentum,
        {"quadratic": _b(300, 1e-3, 0.05), "rosenbrock": _b(3000, 2e-3, 0.1, learning_rate=3e-3)},
        needs_params=True),
]

ENTRY_IDS = [e.name for e in ENTRIES]
BY_NAME = {e.name: e for e in ENTRIES}
