"""Fast-path formulations: bit-identical to the plain math, and free of per-leaf buffer copies.

Some primitives are written in a form chosen for how XLA compiles them (see
``gradtx.transforms.adam._elementwise``). These tests pin both halves of that contract:

* the updates and the new state are *bit-identical*, over several steps on random trees, to a
  straightforward reference implementation of the documented math written here; and
* the compiled step (``update`` + ``apply_updates``, params and state donated) contains no ``copy``
  instruction, i.e. every state leaf is updated in place instead of being copied into a temporary
  first (a structural property of the compiled program, not a timing).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx import numerics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_checks import (array_copies, compiled_step_text, donated_step_text,  # noqa: E402
                          full_size_temporaries)

SHAPES = {"w": (33, 17), "b": (17,), "k": (3, 4, 5), "s": ()}


def _tree(key, dtype, scale=1.0, shapes=SHAPES):
    keys = jax.random.split(key, len(shapes))
    return {name: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            for k, (name, shape) in zip(keys, shapes.items())}


def _step_grads(i, dtype, shapes=SHAPES):
    """The gradients of step ``i`` of the six-step checks: scale ``10**(i-3)`` (1e-3 to 1e2), and
    at step 4 a NaN and an inf in ``w`` (non-finite gradients must propagate identically)."""
    g = _tree(jax.random.PRNGKey(i + 1), dtype, scale=10.0 ** (i - 3), shapes=shapes)
    if i == 4:
        g["w"] = g["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    return g


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _assert_bit_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x), np.asarray(y)
        nan = np.isnan(x.astype(np.float32))
        np.testing.assert_array_equal(nan, np.isnan(y.astype(np.float32)))
        np.testing.assert_array_equal(_bits(x)[~nan], _bits(y)[~nan])


def _assert_steps_bit_identical(tx, fast, ref, dtype):
    """Six steps of ``fast`` and ``ref`` from ``tx.init``, over gradients from 1e-3 to 1e2 in scale
    (one with a NaN and an inf): updates and states bit-identical after every step."""
    params = _tree(jax.random.PRNGKey(0), dtype)
    state_f = state_r = tx.init(params)
    for i in range(6):
        g = _step_grads(i, dtype)
        u_f, state_f = fast(g, state_f)
        u_r, state_r = ref(g, state_r)
        _assert_bit_identical(u_f, u_r)
        _assert_bit_identical(state_f, state_r)


def _belief_reference(b1, b2, eps, eps_root):
    """AdaBelief exactly as documented, with the scalar ``eps_root`` added the plain way; a
    bfloat16 moment is read back as stored (the rounding written out, not numerics.as_stored)."""

    def stored(x, dtype):
        return x.astype(dtype).astype(x.dtype) if dtype == jnp.bfloat16 else x

    def step(grads, state):
        count = numerics.safe_increment(state.count)
        bc1 = numerics.bias_correction(b1, count)
        bc2 = numerics.bias_correction(b2, count)

        def one(g, m, s):
            gc = g.astype(jnp.float32)
            c1, c2 = numerics.hyper(b1), numerics.hyper(b2)
            m_new = stored(c1 * m.astype(jnp.float32) + (1 - c1) * gc, m.dtype)
            d = gc - m_new
            s_new = stored(c2 * s.astype(jnp.float32) + (1 - c2) * (d * d)
                           + numerics.hyper(eps_root), s.dtype)
            den = jnp.sqrt(s_new / bc2) + numerics.hyper(eps)
            u = m_new / (bc1 * den)
            return u.astype(g.dtype), m_new.astype(m.dtype), s_new.astype(s.dtype)

        out = jax.tree.map(one, grads, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], grads, out)  # noqa: E731
        return pick(0), gradtx.ScaleByBeliefState(count, pick(1), pick(2))

    return step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hypers", [dict(), dict(b1=0.8, b2=0.95, eps=1e-8, eps_root=1e-12)])
def test_belief_bit_identical_to_reference(dtype, hypers):
    tx = gradtx.scale_by_belief(**hypers)
    full = dict(b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16) | hypers
    ref = jax.jit(_belief_reference(**full))
    fast = jax.jit(tx.update)
    _assert_steps_bit_identical(tx, fast, ref, dtype)


def _compiled_step_text(tx, dtype=jnp.float32):
    return compiled_step_text(tx, _tree(jax.random.PRNGKey(0), dtype),
                              _tree(jax.random.PRNGKey(1), dtype, scale=0.01))


def test_copy_detector_sees_a_copy():
    # the structural check below must be able to fail: a step that reads the old state after
    # writing the new one in place forces XLA to copy the donated buffer
    def step(p, s, g):
        s_new = 0.5 * s + g
        return p + jnp.sign(0.9 * s + g), s_new

    x = jnp.ones((64, 64), jnp.float32)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(x, x, x).compile().as_text()
    assert len(array_copies(text)) >= 1


@pytest.mark.parametrize("make", [
    lambda: gradtx.scale_by_belief(),
    lambda: gradtx.scale_by_belief(eps=1e-8, eps_root=0.0),
    lambda: gradtx.adabelief(1e-3),
    lambda: gradtx.adam(1e-3),
    lambda: gradtx.adamw(1e-3, weight_decay=1e-4),
], ids=["scale_by_belief", "scale_by_belief_eps_root0", "adabelief", "adam", "adamw"])
def test_donated_step_updates_state_in_place(make):
    copies = array_copies(_compiled_step_text(make()))
    assert copies == [], "the compiled step copies donated state buffers:\n" + "\n".join(copies)


def test_temporary_detector_sees_a_shared_producer():
    # the check below must be able to fail: XLA's CPU backend materialises an expression that
    # feeds two reductions (Adafactor's row and column means of G² + ε₁, written the plain way)
    def stats(g):
        sq = g * g + 1e-30
        return jnp.mean(sq, axis=1), jnp.mean(sq, axis=0)

    x = jnp.ones((96, 160), jnp.float32)
    text = jax.jit(stats).lower(x).compile().as_text()
    if jax.default_backend() == "cpu":
        assert len(full_size_temporaries(text, (96, 160))) >= 1
    assert full_size_temporaries(text, (7, 7)) == []


_ADAFACTORS = {
    "adafactor": lambda: gradtx.adafactor(1e-3),
    "adafactor_unfactored": lambda: gradtx.adafactor(1e-3, factored=False),
    "adafactor_relative_noclip": lambda: gradtx.adafactor(None, clipping_threshold=None),
    "factored_rms": lambda: gradtx.chain(gradtx.scale_by_factored_rms(),
                                         gradtx.scale_by_learning_rate(1e-3)),
}


@pytest.mark.parametrize("name", sorted(_ADAFACTORS))
def test_adafactor_step_has_no_parameter_sized_temporary(name):
    # The row and column statistics, the clipping RMS and the update each read G in their own
    # fused loop; nothing parameter-sized is written but the new params (and the full second
    # moment when unfactored). A temporary costs a write, a read and, on CPU, page faults
    # (Adafactor on a 16M-element leaf: ~50 -> ~25 ms when the two were removed).
    shape = (136, 200)   # both dimensions >= 128: factored by default
    text = donated_step_text(_ADAFACTORS[name](), shape)
    temps = full_size_temporaries(text, shape)
    assert temps == [], "parameter-sized temporaries in the compiled step:\n" + "\n".join(temps)
    assert array_copies(text) == []


@pytest.mark.parametrize("name", ["adafactor", "adafactor_relative_noclip", "factored_rms"])
def test_bfloat16_adafactor_step_has_no_parameter_sized_temporary(name):
    # With bfloat16 leaves each use of G and p also converts it to float32 in its own loop: a
    # conversion shared by two uses would be materialised as a float32 copy (twice the leaf's
    # bytes). (Unfactored, the float32 second moment the direction uses is stored rounded, so the
    # unrounded one is a temporary by construction; that case is not checked here.)
    shape = (136, 200)
    text = donated_step_text(_ADAFACTORS[name](), shape, jnp.bfloat16)
    temps = full_size_temporaries(text, shape) + full_size_temporaries(text, shape, "bf16")
    assert temps == [], "parameter-sized temporaries:\n" + "\n".join(temps)


@pytest.mark.parametrize("make", [lambda: gradtx.adadelta(1.0), gradtx.scale_by_adadelta],
                         ids=["adadelta", "scale_by_adadelta"])
def test_adadelta_step_keeps_one_temporary(make):
    # The update needs sqrt(x + eps) of the *old* x, which the step overwrites in place: one
    # parameter-sized temporary (or a copy of x) is unavoidable. The step Δ that updates x is
    # recomputed in x's own loop instead of being materialised as a second one (~71 -> ~55 ms
    # on a 16M-element leaf).
    shape = (136, 200)
    text = donated_step_text(make(), shape)
    temps = full_size_temporaries(text, shape)
    assert len(temps) == 1 and "sqrt" in temps[0], "\n".join(temps)
    assert array_copies(text) == []


def _adadelta_reference(rho, eps):
    """Adadelta exactly as documented, each quantity computed once, the plain way."""

    def step(grads, state):
        def one(g, eg, ex):
            gc = g.astype(jnp.float32)
            r, e = numerics.hyper(rho), numerics.hyper(eps)
            eg_new = r * eg.astype(jnp.float32) + (1 - r) * (gc * gc)
            delta = gc * (jnp.sqrt(ex.astype(jnp.float32) + e) / jnp.sqrt(eg_new + e))
            ex_new = r * ex.astype(jnp.float32) + (1 - r) * (delta * delta)
            return delta.astype(g.dtype), eg_new.astype(eg.dtype), ex_new.astype(ex.dtype)

        out = jax.tree.map(one, grads, state.e_g, state.e_x)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], grads, out)  # noqa: E731
        return pick(0), gradtx.ScaleByAdadeltaState(pick(1), pick(2))

    return step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hypers", [dict(), dict(rho=0.5, eps=1e-3)])
def test_adadelta_bit_identical_to_reference(dtype, hypers):
    # the recomputed step (test_adadelta_step_keeps_one_temporary) changes where XLA evaluates
    # Δ, not its value
    tx = gradtx.scale_by_adadelta(**hypers)
    ref = jax.jit(_adadelta_reference(**(dict(rho=0.9, eps=1e-6) | hypers)))
    fast = jax.jit(tx.update)
    _assert_steps_bit_identical(tx, fast, ref, dtype)


# --------------------------------------------------------------------------------------------
# The trust ratio's norm from the chain's replay (gradtx.combine._run_in_order)

def _nested(*members):
    """The same chain with its first member wrapped in another chain: a nested chain cannot
    replay its updates, so the trust ratio takes its norm from the updates themselves."""
    return gradtx.chain(gradtx.chain(members[0]), *members[1:])


def _matrices_only(params):
    """Decay mask: the leaves with more than one dimension."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)

_REPLAYED_CHAINS = {
    "lamb": lambda: (gradtx.scale_by_adam(eps=1e-6), gradtx.add_decoupled_weight_decay(1e-2),
                     gradtx.scale_by_trust_ratio(), gradtx.scale_by_learning_rate(1e-3)),
    "masked_decay_amsgrad": lambda: (
        gradtx.scale_by_adam(amsgrad=True), gradtx.add_decoupled_weight_decay(0.1, mask=_matrices_only),
        gradtx.scale_by_trust_ratio(min_ratio=0.5, max_ratio=3.0), gradtx.scale_by_learning_rate(0.1)),
    "nadam_eps_root": lambda: (gradtx.scale_by_adam(nesterov=True, eps_root=1e-12),
                               gradtx.scale_by_trust_ratio(eps=1e-3)),
    "lars": lambda: (gradtx.add_decoupled_weight_decay(1e-3),
                     gradtx.scale_by_trust_ratio(form="lars", weight_decay=1e-3,
                                                 trust_coefficient=0.01),
                     gradtx.scale_by_learning_rate(0.1), gradtx.trace(decay=0.9)),
    # moments stored in bfloat16 are read back as stored (numerics.as_stored): the stored state
    # determines the direction, so it replays too -- with bfloat16 parameters (the moments take
    # their dtype) and with float32 ones
    "bf16_params_lamb": lambda: _REPLAYED_CHAINS["lamb"](),
    "bf16_moments_amsgrad": lambda: (
        gradtx.scale_by_adam(amsgrad=True, mu_dtype="bfloat16", nu_dtype="bfloat16"),
        gradtx.add_decoupled_weight_decay(0.1), gradtx.scale_by_trust_ratio()),
}
# combinations that cannot replay (the result must not change either)
_FALLBACK_CHAINS = {
    # float16 moments: the direction uses the unrounded values, which the state does not hold
    "f16_moments": lambda: (gradtx.scale_by_adam(mu_dtype="float16"),
                            gradtx.scale_by_trust_ratio()),
    "decay_schedule": lambda: (gradtx.scale_by_adam(),
                               gradtx.add_decoupled_weight_decay(gradtx.schedules.exponential(1e-2, 0.5)),
                               gradtx.scale_by_trust_ratio()),
    "torch_nadam": lambda: (gradtx.scale_by_adam(nesterov=True, momentum_decay=4e-3),
                            gradtx.scale_by_trust_ratio()),
}


def _param_dtype(name: str):
    return jnp.bfloat16 if name.startswith("bf16_params") else jnp.float32


# one leaf large enough for the recomputed norm (gradtx.transforms.trust_ratio._RECOMPUTE_FROM),
# the others below it
_MIXED = {"w": (256, 300), "b": (300,), "k": (3, 4, 5), "s": ()}


def _run_steps(tx, dtype, jit: bool):
    """Six steps (gradients from 1e-3 to 1e2 in scale, one with a NaN and an inf): the
    parameters after each step and the final state's leaves."""
    params = _tree(jax.random.PRNGKey(0), dtype, shapes=_MIXED)
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    trajectory = []
    for i in range(6):
        g = _step_grads(i, dtype, _MIXED)
        if i == 4:
            g["k"] = g["k"].at[0, 0, 0].set(jnp.inf)
        params, state = step(params, state, g)
        trajectory.append(params)
    return trajectory, jax.tree.leaves(state)


def _assert_trajectories_agree(a, b, exact: bool):
    """Bit for bit, or (``exact=False``) to float32 rounding: under jit the norm is computed by
    another loop than the update, and XLA's CPU backend contracts ``a·b + c`` into fused
    multiply-adds as each loop's code allows, so the two may differ in the last bit (as any two
    XLA programs computing the same expression may)."""
    if exact:
        _assert_bit_identical(a, b)
        return
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=0)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", sorted(_REPLAYED_CHAINS) + sorted(_FALLBACK_CHAINS))
def test_trust_ratio_with_replayed_norm_matches_the_plain_chain(name, jit):
    # the chain takes the trust ratio's norm from updates recomputed out of the new state; the
    # same chain with its first member nested cannot, and takes it from the updates: parameters
    # and states agree bit for bit eagerly (the same operations on the same values), and to
    # float32 rounding under jit, NaN and inf included
    members = {**_REPLAYED_CHAINS, **_FALLBACK_CHAINS}[name]()
    dtype = _param_dtype(name)
    replayed = _run_steps(gradtx.chain(*members), dtype, jit)
    plain = _run_steps(_nested(*members), dtype, jit)
    _assert_trajectories_agree(replayed, plain, exact=not jit)


def test_named_chain_replays_like_chain():
    members = _REPLAYED_CHAINS["lamb"]()
    named = gradtx.named_chain(*((f"m{i}", tx) for i, tx in enumerate(members)))
    for jit in (True, False):
        _assert_trajectories_agree(_run_steps(named, jnp.float32, jit),
                                   _run_steps(_nested(*members), jnp.float32, jit), exact=not jit)


_EQUAL_SHAPES = {"a": (256, 256), "b": (256, 256), "c": (128, 512), "v": (512,)}


@pytest.mark.parametrize("name", sorted(_REPLAYED_CHAINS))
def test_replayed_trust_ratio_step_writes_no_temporary(name):
    # LAMB's direction feeds the norm and the parameter update; recomputed for the norm from the
    # new moments, it is never materialised. Several leaves of the same shape: a scalar's
    # broadcast shared by their reductions would be materialised too (each replay reads its
    # scalars through a per-leaf barrier). The nested chain shows the detector sees the direction.
    if jax.default_backend() != "cpu":
        pytest.skip("describes XLA's CPU backend")
    dtype = _param_dtype(name)
    params = _tree(jax.random.PRNGKey(0), dtype, shapes=_EQUAL_SHAPES)
    grads = _tree(jax.random.PRNGKey(1), dtype, 0.01, _EQUAL_SHAPES)
    members = _REPLAYED_CHAINS[name]()
    text = compiled_step_text(gradtx.chain(*members), params, grads)
    matrices = [(256, 256), (128, 512)]

    def temporaries(hlo):
        return [t for shape in matrices for hlo_dtype in ("f32", "bf16")
                for t in full_size_temporaries(hlo, shape, hlo_dtype)]

    assert temporaries(text) == [], "parameter-sized temporaries:\n" + "\n".join(temporaries(text))
    assert array_copies(text) == []
    if name != "lars":    # LARS's direction g + λp is cheap: XLA recomputes it either way
        assert temporaries(compiled_step_text(_nested(*members), params, grads))


def test_small_leaves_take_the_norm_from_the_updates():
    # below the size threshold the recomputation is dropped (the materialised updates are small),
    # so many small leaves compile to the same program as without it
    params = {f"w{i}": jnp.full((32, 48), 0.1 * (i + 1)) for i in range(4)}
    members = _REPLAYED_CHAINS["lamb"]()
    replayed = compiled_step_text(gradtx.chain(*members), params, params)
    nested = compiled_step_text(_nested(*members), params, params)
    assert replayed.count(" fusion(") == nested.count(" fusion(")
    assert "reduce" in replayed


def test_plain_adam_does_not_keep_its_moments():
    # the moments are pinned to their buffers only for a replay: inside quantized_state the new
    # moments are not stored as computed, and pinning them would materialise float32 copies
    if jax.default_backend() != "cpu":
        pytest.skip("describes XLA's CPU backend")
    from gradtx.quantization import quantized_state
    shape = (512, 512)
    text = donated_step_text(quantized_state(gradtx.adamw(1e-3)), shape)
    assert full_size_temporaries(text, shape) == []


def test_quantized_lamb_does_not_replay():
    # quantized_state re-encodes its inner state, so moments kept in their buffers for a replay
    # would only add float32 temporaries: it turns the replay off (combine.NO_REPLAY), and the
    # step keeps LAMB's one temporary, the direction
    if jax.default_backend() != "cpu":
        pytest.skip("describes XLA's CPU backend")
    from gradtx.quantization import quantized_state
    shape = (512, 512)
    text = donated_step_text(quantized_state(gradtx.lamb(1e-3)), shape)
    assert len(full_size_temporaries(text, shape)) == 1


def test_computed_once_is_the_identity_bit_for_bit():
    x = jnp.array([1.5, -0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 1e-45, -3.4e38], jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        y = x.astype(dtype)
        _assert_bit_identical(jax.jit(numerics.computed_once)(y, jnp.int32(7)), y)
    z = jnp.array([1 - 0j, -0.0 + 2j])
    assert numerics.computed_once(z, jnp.int32(1)) is z
    grad = jax.grad(lambda v: jnp.sum(numerics.computed_once(v, jnp.int32(3)) * 2.0))
    np.testing.assert_array_equal(grad(jnp.array([0.5, -4.0])), [2.0, 2.0])
