"""XLA compiler options that let a jitted optimizer step update its donated buffers in place."""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from gradtx import numerics

__all__ = ["compiler_options", "xla_flags"]

_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"

# Per backend: the options and why. Only options measured to remove work without changing a
# single bit of the results belong here (tests/test_compiler_options.py checks both).
_OPTIONS = {
    "cpu": {_REGION_ANALYSIS: True},
    "gpu": {},
    "tpu": {},
}
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

# Per backend: process-wide XLA flags (the $XLA_FLAGS syntax) for what jax.jit's compiler_options
# cannot carry. XLA's CPU multi-output fusion is switched on by a *backend extra option*, a map
# field of the debug options that compiler_options rejects ("not a valid message value"), so it can
# only be set through XLA_FLAGS. tests/test_xla_flags.py checks that these flags change every
# registry optimizer's results by rounding at most and that AdamW's step becomes one loop.
_FLAGS = {
    "cpu": (f"--{_REGION_ANALYSIS}=true",
            "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"),
    "gpu": (),
    "tpu": (),
}


def _backend_key(backend, caller: str, allow_none: bool) -> str:
    if backend is None and allow_none:
        backend = jax.default_backend()
    if not isinstance(backend, str):
        hint = " (or None for jax.default_backend())" if allow_none else ""
        raise TypeError(f"{caller}: backend={backend!r} must be a string such as 'cpu', 'gpu' or "
                        f"'tpu'{hint}.")
    key = _ALIASES.get(backend.lower(), backend.lower())
    if key not in _OPTIONS:
        fix = "pass None to use jax.default_backend()" if allow_none else \
            "name the backend the process will use"
        raise ValueError(f"{caller}: backend={backend!r} is not one of "
                         f"{sorted(set(_OPTIONS) | set(_ALIASES))}; {fix}.")
    return key


def compiler_options(backend: str | None = None) -> dict:
    """XLA options for compiling a training step whose params and state are donated.

    Pass the result to ``jax.jit``::

        step = jax.jit(train_step, donate_argnums=(0, 1),
                       compiler_options=gradtx.compiler_options())

    **Why.** Donating params and state lets XLA write the new values into the old buffers. On the
    CPU backend, XLA's default copy insertion cannot prove that an update which still *reads the
    old value of a state buffer after the new value is computed* -- Lion with ``b1 >= b2`` or a
    bfloat16 moment (``sign(β₁m + (1−β₁)g)`` needs the old ``m`` while ``m`` is overwritten
    with ``β₂m + (1−β₂)g``; with the default betas gradtx reads the direction from the new
    ``m``), AMSGrad's ``max(ν_max, v')`` in bfloat16, Adadelta, the clipping and trust-ratio
    chains in a step that also computes the gradients -- reads it before the in-place write, so it
    copies the whole donated buffer into a fresh temporary first. ``--xla_cpu_copy_insertion_use_
    region_analysis`` orders those reads and removes the copies. Measured on this project's 2-core
    CPU (``benchmarks/``) before gradtx removed these two cases by construction: AdamW with a
    bfloat16 first moment 23.0 → 15.5 ms (a bfloat16 moment is now read back as stored,
    :func:`gradtx.numerics.as_stored`), Lion with the old-moment formula on a 16M-element leaf
    33.8 → 11.6 ms; it changes no result bit (it only decides where buffers live). Optax steps
    benefit the same way (Optax's Lion and its ``mu_dtype`` always read the old moment).

    Returns a fresh ``dict`` for ``backend`` (``"cpu"``, ``"gpu"``/``"cuda"``/``"rocm"``,
    ``"tpu"``; default ``jax.default_backend()``): ``{"xla_cpu_copy_insertion_use_region_analysis":
    True}`` on CPU, ``{}`` elsewhere (no option found to help there). Where ``jax.jit`` is not
    called directly (``flax.nnx.jit`` has no ``compiler_options``), set the same option for the
    whole process before JAX starts: ``XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true``.
    Neither Optax nor torch has an equivalent (torch's ``fused=True`` kernels update in place by
    construction).

    Example:
        >>> import jax, jax.numpy as jnp, gradtx
        >>> gradtx.compiler_options("cpu")
        {'xla_cpu_copy_insertion_use_region_analysis': True}
        >>> gradtx.compiler_options("gpu")
        {}
        >>> tx = gradtx.lion(1e-4)
        >>> def step(p, s, g):
        ...     u, s = tx.update(g, s, p)
        ...     return gradtx.apply_updates(p, u), s
        >>> p = jnp.ones(4096)
        >>> fast = jax.jit(step, donate_argnums=(0, 1), compiler_options=gradtx.compiler_options("cpu"))
        >>> p, s = fast(p, tx.init(p), jnp.ones(4096))
        >>> p[:2].tolist()
        [0.9998999238014221, 0.9998999238014221]
    """
    return dict(_OPTIONS[_backend_key(backend, "compiler_options", allow_none=True)])


def xla_flags(backend: str) -> str:
    """Process-wide XLA flags (for ``$XLA_FLAGS``) worth trying for faster optimizer steps.

    Some of XLA's switches cannot be passed per call through :func:`compiler_options`: they live
    in ``XLA_FLAGS``, which XLA reads once, when the process runs its first JAX computation (not at
    ``import jax``). Set them in the environment of the training process, or in Python before the
    first computation::

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + gradtx.xla_flags("cpu")).strip()

    On CPU the result is ``--xla_cpu_copy_insertion_use_region_analysis=true`` (what
    :func:`compiler_options` sets, here for every jit of the process, ``flax.nnx.jit`` included)
    and ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``: XLA's CPU *multi-output
    fusion*, off by default, which merges loops over the same elements that read the same arrays
    into one loop writing several outputs: Lion's ``m'`` and ``p'`` become one pass over ``p, g,
    m``; and since it does not merge a loop with the loop that reads its result, gradtx's state
    primitives then compute their update from the old state (Adam's ``p'`` from ``m``, ``v``, not
    ``m'``, ``v'``), so that AdamW's whole step is one loop too (``docs/performance.md``, "One loop
    per leaf"). It is not a free win everywhere, so measure your own step. On this project's 2-core
    CPU (``benchmarks/RESULTS-tuned.md``, huge pages and region analysis for every candidate,
    ratios to Optax in the same run): SGD with Nesterov momentum 0.70x (0.96 of its bandwidth
    floor), AdamW 0.77x on a 12-layer transformer tree but on par on one 16M-element leaf, AdamW
    with a bfloat16 first moment 0.53x, LAMB 0.63x, Adafactor 0.51-0.64x; Lion at 0.9-0.99 of its
    floor.

    Results may differ from the default environment's in the last bit: XLA contracts multiply-adds
    into FMAs depending on what else a loop computes (``tests/test_xla_flags.py`` checks every
    registry optimizer to float32 rounding). The flag also applies to the model's own loops:
    check your model's compile time and results once. GPU and TPU: ``""`` (XLA already fuses
    sibling loops there).

    ``backend`` must be named (``"cpu"``, ``"gpu"``/``"cuda"``/``"rocm"``, ``"tpu"``): asking JAX
    for its default backend would start it, after which the flags are ignored. If ``XLA_FLAGS``
    already holds ``--xla_backend_extra_options``, merge the keys into that one flag
    (comma-separated): the last occurrence of a flag wins. Neither Optax nor torch has an
    equivalent (torch's ``fused=True`` kernels are hand-fused).

    Example:
        >>> import gradtx
        >>> gradtx.xla_flags("cpu").split()
        ['--xla_cpu_copy_insertion_use_region_analysis=true', '--xla_backend_extra_options=xla_cpu_use_multi_output_fusion']
        >>> gradtx.xla_flags("gpu")
        ''
    """
    return " ".join(_FLAGS[_backend_key(backend, "xla_flags", allow_none=False)])


# --- Which loop structure the backend's compiler fuses (used by gradtx.tree.map_leaves) ---------
#
# A primitive such as Adam computes its new state (m', v') and its update from it. On a backend
# whose fusion merges a state loop with the loop that consumes its result (producer-consumer
# multi-output fusion), that is one pass. XLA's CPU backend with multi-output fusion switched on
# (gradtx.xla_flags("cpu")) only merges *sibling* loops -- loops that read the same arrays -- so
# the update, which reads m' and v', stays a loop of its own: 10 passes over a leaf's size for
# AdamW where one loop needs 7. If the update is instead recomputed from the *old* state (its
# inputs multiplied by a 1 that XLA cannot see through, so that it does not reuse m': _opaque), the
# three loops are siblings and merge
# into one that reads p, g, m, v and writes p, m, v. Without multi-output fusion the same program
# would be three loops, the update re-reading the old state after it was overwritten in place, so
# XLA would copy it first: the recomputation only pays where the compiler merges siblings and not
# producer-consumer chains. Which is the case is asked of the compiler itself, once per backend per
# process, by compiling the two structures on a small array (~0.1 s) and counting the loops.

_COMPUTED_STATE = contextvars.ContextVar("gradtx_state_is_computed", default=False)
_PROBE_SIZE = 4096


def _array_loops(hlo_text: str, shape: str = f"[{_PROBE_SIZE}]") -> int:
    """Fusions in the entry computation whose result type contains ``shape`` (an HLO shape such
    as ``f32[256,256]``, or just its dimensions)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    count = 0
    for line in entry.splitlines():
        line = line.strip()
        if line.startswith("%") and " fusion(" in line:
            result_type = line.split("=", 1)[1].split(" fusion(", 1)[0]
            count += shape in result_type
    return count


def _opaque(arrays) -> tuple:
    """``arrays``, each multiplied by a 1 that XLA cannot see through: the same values (exact for
    every real value), but expressions of their own, so a computation built from them is not
    merged with the same computation on the originals. Unlike a barrier on the arrays themselves,
    an array that is an expression (a clipped gradient) is not materialised."""
    return tuple(x * numerics.unshared(jnp.ones((), jnp.result_type(x))) for x in arrays)


def _probe_consumer(p, m, g):
    m_new = 0.5 * m + g
    return p - m_new / (jnp.abs(m_new) + 1.0), m_new


def _probe_sibling(p, m, g):
    m_new = 0.5 * m + g
    m_again = 0.5 * _opaque((m,))[0] + g
    return p - m_again / (jnp.abs(m_again) + 1.0), m_new


@functools.lru_cache(maxsize=None)
def _merges_siblings_only(backend: str) -> bool:
    spec = jax.ShapeDtypeStruct((_PROBE_SIZE,), jnp.float32)

    def loops(fn):
        compiled = jax.jit(fn, donate_argnums=(0, 1), backend=backend) \
            .lower(spec, spec, spec).compile()
        return _array_loops(compiled.as_text())
    try:
        return loops(_probe_consumer) > 1 and loops(_probe_sibling) == 1
    except Exception:  # noqa: BLE001 -- a backend without HLO text: keep the plain structure
        return False


def _update_from_old_state() -> bool:
    """Whether a primitive should compute its update from its old state (see above): the
    default backend's compiler merges sibling loops only, and the state is not computed by a
    wrapper (:func:`_state_is_computed`)."""
    if _COMPUTED_STATE.get():
        return False
    return _merges_siblings_only(jax.default_backend())


@contextlib.contextmanager
def _state_is_computed():
    """Within this context the state a primitive receives is an expression (8-bit codes decoded
    by :class:`gradtx.quantized_state`), not a buffer of the step: recomputing the update would
    decode it a second time (measured 1.24x slower), so primitives keep the plain structure."""
    token = _COMPUTED_STATE.set(True)
    try:
        yield
    finally:
        _COMPUTED_STATE.reset(token)
