"""Conformance suite: every optimizer in the registry honours the transform contract.

Driven entirely by tests/optimizer_registry.py (entries, budgets and capability flags); there are
no special cases by name here. Each test jit-compiles at most once per entry and configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from exact_checks import (compiled_step_text, donated_step_text,  # noqa: E402
                          full_size_temporaries, same_shaped_step_computations)
from optimizer_registry import ENTRIES, ENTRY_IDS, PROBLEMS, REPR_NAMESPACE  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _convergence_cases():
    cases = []
    for entry in ENTRIES:
        for problem, budget in entry.budgets.items():
            cases.append(pytest.param(entry, problem, "float32", id=f"{entry.name}-{problem}-f32"))
            if entry.supports_bf16_convergence and budget.bf16_tol is not None:
                cases.append(pytest.param(entry, problem, "bfloat16",
                                          id=f"{entry.name}-{problem}-bf16"))
    return cases


by_entry = pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
by_entry_and_dtype = pytest.mark.parametrize(
    "entry,dtype", [pytest.param(e, d, id=f"{e.name}-{d}") for e in ENTRIES for d in DTYPES])


def _params(dtype="float32"):
    return PROBLEMS["quadratic"].init(DTYPES[dtype])


def _grads(params, step=0):
    """Deterministic, trajectory-dependent gradients of a non-quadratic loss, in params' dtypes."""
    def loss(p):
        return sum(jnp.sum(jnp.sin(3.0 * x.astype(jnp.float32) + step) * (x.astype(jnp.float32) ** 2))
                   for x in jax.tree.leaves(p))
    return jax.grad(loss)(params)


def _train(tx, problem, params, steps):
    """``steps`` jitted steps on ``problem`` from ``params``; the final params (dtypes checked
    unchanged) and each leaf's max distance to the solution."""
    @jax.jit
    def run(params):
        def body(_, carry):
            p, s = carry
            u, s = tx.update(jax.grad(problem.loss)(p), s, p)
            return gradtx.apply_updates(p, u), s
        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    final = run(params)
    assert jax.tree.map(lambda x: x.dtype, final) == jax.tree.map(lambda x: x.dtype, params)
    errors = jax.tree.map(lambda p, s: float(jnp.max(jnp.abs(p.astype(jnp.float32) - s))),
                          final, problem.solution())
    return final, errors


def _run_eager(tx, params, steps, **extra):
    state = tx.init(params)
    out = []
    for i in range(steps):
        updates, state = tx.update(_grads(params, i), state, params, **extra)
        params = gradtx.apply_updates(params, updates)
        out.append((updates, params))
    return out, state


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x),
                                   bool(getattr(jax.typeof(x), "weak_type", False))), tree)


def _assert_trees_equal(a, b, exact=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if exact:
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
        else:
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                       rtol=2e-6, atol=1e-7)


def _holds_array(obj, depth=0):
    """Whether a transform (recursively: fields, tuples, dicts, frozen trees) holds an array."""
    if isinstance(obj, (jax.Array, np.ndarray)):
        return True
    if depth > 20 or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return False
    if isinstance(obj, (tuple, list)):
        return any(_holds_array(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return any(_holds_array(x, depth + 1) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_holds_array(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    return False


@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_converges_on_bfloat16_params_with_master_weights(entry):
    """Every optimizer trains bfloat16 parameters when wrapped in master_weights: the float32
    master copy follows (almost) the float32 run, and the bf16 params end within the float32
    tolerance plus bf16 rounding of the solution. (On Rosenbrock the valley is narrower than the
    bf16 grid near (1, 1), so gradients at rounded points jitter by more than these tolerances;
    plain-bf16 Rosenbrock convergence is checked by test_converges where the registry flags it.)"""
    problem_name = "quadratic"
    problem = PROBLEMS[problem_name]
    budget = entry.budgets[problem_name]
    tx = gradtx.master_weights(entry.make(problem_name))
    params = problem.init(jnp.bfloat16)
    final, errors = _train(tx, problem, params, budget.steps)
    # bf16 keeps 8 significant bits: half an ulp of a value of magnitude up to 4 is 2**-7
    tol = budget.tol + 2.0 ** -7 + 0.01
    assert max(jax.tree.leaves(errors)) <= tol, (
        f"{entry.name} on {problem_name} (bf16 + master_weights): max error {errors} > {tol}")


# ---------------------------------------------------------------------------------------------
# Registry sanity (a malformed registry would silently test less)


def test_registry_is_well_formed():
    assert len(set(ENTRY_IDS)) == len(ENTRY_IDS)
    for entry in ENTRIES:
        assert set(entry.budgets) == set(PROBLEMS), entry
        if entry.supports_bf16_convergence:
            assert any(b.bf16_tol is not None for b in entry.budgets.values()), entry
        else:
            assert all(b.bf16_tol is None for b in entry.budgets.values()), entry


# ---------------------------------------------------------------------------------------------
# Convergence


@pytest.mark.parametrize("entry,problem_name,dtype", _convergence_cases())
def test_converges(entry, problem_name, dtype):
    problem = PROBLEMS[problem_name]
    budget = entry.budgets[problem_name]
    tx = entry.make(problem_name)
    params = problem.init(DTYPES[dtype])
    final, errors = _train(tx, problem, params, budget.steps)
    tol = budget.tol if dtype == "float32" else budget.bf16_tol
    assert max(jax.tree.leaves(errors)) <= tol, (
        f"{entry.name} on {problem_name} ({dtype}): max error {errors} > {tol} after "
        f"{budget.steps} steps; initial loss {float(problem.loss(params)):.4g}, final "
        f"{float(problem.loss(final)):.4g}")
    assert float(problem.loss(final)) < float(problem.loss(params))


# ---------------------------------------------------------------------------------------------
# Compilation, dtypes, structure


@by_entry
def test_no_recompile_on_second_step(entry):
    tx = entry.make()
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(_grads(params), state, params)
        return gradtx.apply_updates(params, updates), state

    params = _params()
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1 and step._cache_size() == 1


@by_entry
def test_same_shaped_leaves_compile_to_shared_computations(entry):
    """Compile time stays flat per leaf: each same-shaped leaf's loops are the same XLA
    computations (XLA compiles each distinct one on its own, ~10 ms on CPU), so adding leaves of a
    shape already present adds no computation to compile. A leaf-specific constant in a loop (its
    position, an offset into a shared buffer) would add one per leaf."""
    tx = entry.make()
    distinct = functools.partial(same_shaped_step_computations, tx, shape=(16, 24), grads=_grads)
    assert distinct(2) == distinct(5)


@by_entry_and_dtype
def test_keeps_update_and_state_dtypes_and_structure(entry, dtype):
    tx = entry.make()
    params = _params(dtype)
    state0 = tx.init(params)
    grads = _grads(params)
    updates, state1 = tx.update(grads, state0, params)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda g: g.dtype, grads)
    assert jax.tree.structure(state1) == jax.tree.structure(state0)
    assert _avals(state1) == _avals(state0)
    # Per-parameter state (leaves shaped like a parameter) is stored in the parameter's dtype by
    # default; counters are int32.
    param_shapes = {jnp.shape(p) for p in jax.tree.leaves(params)}
    for leaf in jax.tree.leaves(state0):
        if jnp.shape(leaf) in param_shapes and jnp.shape(leaf) != ():
            assert jnp.result_type(leaf) == DTYPES[dtype], (entry.name, leaf)
        assert jnp.issubdtype(jnp.result_type(leaf), jnp.floating) or \
            jnp.result_type(leaf) in (jnp.int32, jnp.bool_), (entry.name, jnp.result_type(leaf))
    # A second update keeps everything too.
    updates2, state2 = tx.update(_grads(gradtx.apply_updates(params, updates), 1), state1, params)
    assert _avals(state2) == _avals(state0)
    assert jax.tree.map(lambda u: u.dtype, updates2) == jax.tree.map(lambda g: g.dtype, grads)


@by_entry_and_dtype
def test_state_survives_lax_cond(entry, dtype):
    tx = entry.make()
    params = _params(dtype)
    state = tx.init(params)
    grads = _grads(params)

    @jax.jit
    def maybe_update(pred, state):
        return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

    skipped = maybe_update(False, state)
    taken = maybe_update(True, state)
    assert maybe_update._cache_size() == 1
    _assert_trees_equal(skipped, state)
    _assert_trees_equal(taken, tx.update(grads, state, params)[1], exact=False)
    assert _avals(taken) == _avals(state)


@by_entry
def test_abstract_init(entry):
    tx = entry.make()
    params = _params()
    abstract = jax.eval_shape(tx.init, params)
    concrete = tx.init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == \
        jax.tree.map(lambda c: (jnp.shape(c), jnp.result_type(c)), concrete)
    # init also accepts abstract leaves directly.
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    assert jax.tree.structure(jax.eval_shape(tx.init, shapes)) == jax.tree.structure(concrete)


# ---------------------------------------------------------------------------------------------
# Protocol: extra kwargs, jit vs eager, params


@by_entry
def test_accepts_unknown_extra_kwargs(entry):
    tx = entry.make()
    params = _params()
    plain, _ = _run_eager(tx, params, 2)
    extra, _ = _run_eager(tx, params, 2, some_unknown_kwarg=1.0, value=jnp.float32(3.0))
    _assert_trees_equal(plain, extra)


@by_entry
def test_jit_matches_eager(entry):
    tx = entry.make()
    params = _params()
    eager, eager_state = _run_eager(tx, params, 3)

    @jax.jit
    def step(params, state, i):
        updates, state = tx.update(_grads(params, i), state, params)
        return updates, gradtx.apply_updates(params, updates), state

    state = tx.init(params)
    for i, (eager_updates, eager_params) in enumerate(eager):
        updates, params, state = step(params, state, i)
        _assert_trees_equal(updates, eager_updates, exact=False)
        _assert_trees_equal(params, eager_params, exact=False)
    _assert_trees_equal(state, eager_state, exact=False)
    assert step._cache_size() == 1


@by_entry
def test_params_requirement_matches_flag(entry):
    tx = entry.make()
    params = _params()
    grads = _grads(params)
    state = tx.init(params)
    if entry.needs_params:
        with pytest.raises(ValueError, match="params") as info:
            tx.update(grads, state)
        # The error names the member that reads the parameters.
        assert any(name in str(info.value) for name in (
            "add_decoupled_weight_decay", "scale_by_trust_ratio", "scale_by_factored_rms",
            "scale_by_param_block_rms")), str(info.value)
    else:
        without, _ = tx.update(grads, state)
        with_params, _ = tx.update(grads, state, params)
        _assert_trees_equal(without, with_params)


@by_entry
def test_tree_mismatch_names_first_differing_path(entry):
    tx = entry.make()
    params = _params()
    state = tx.init(params)
    grads = _grads(params)
    per_leaf_state = any(jnp.ndim(x) >= 1 for x in jax.tree.leaves(state))
    if not (per_leaf_state or entry.needs_params):
        pytest.skip("no per-parameter state and no params: nothing for a tree to mismatch")
    renamed = {"w": grads["w"], "z": grads["m"]}
    with pytest.raises(ValueError, match=r"\['(z|m)'\]"):
        tx.update(renamed, state, params)


# ---------------------------------------------------------------------------------------------
# The alias is its explicit chain; transforms are values


@by_entry
def test_equals_explicit_chain(entry):
    tx, explicit = entry.make(), entry.make_explicit()
    assert tx == explicit and hash(tx) == hash(explicit) and repr(tx) == repr(explicit)
    params = _params()
    ours, ours_state = _run_eager(tx, params, 4)
    theirs, theirs_state = _run_eager(explicit, params, 4)
    _assert_trees_equal(ours, theirs)
    _assert_trees_equal(ours_state, theirs_state)
    for problem in PROBLEMS:    # per-problem configurations too
        assert entry.make(problem) == entry.make_explicit(problem)


@by_entry
def test_value_semantics_and_repr_round_trip(entry):
    tx = entry.make()
    assert tx == entry.make() and hash(tx) == hash(entry.make())
    assert not _holds_array(tx), f"{tx!r} holds an array"
    namespace = dict(vars(gradtx), **REPR_NAMESPACE)
    rebuilt = eval(repr(tx), namespace)  # noqa: S307 - the repr is the call that built it
    assert rebuilt == tx and hash(rebuilt) == hash(tx)


@by_entry
def test_equal_rebuilt_optimizer_does_not_retrace(entry):
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def step(tx, params, state):
        traces.append(1)
        return tx.update(_grads(params), state, params)

    params = _params()
    _, state = step(entry.make(), params, entry.make().init(params))
    step(entry.make(), params, state)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# Capability-driven properties


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sign_based],
                         ids=[e.name for e in ENTRIES if e.sign_based])
def test_sign_based_updates_ignore_gradient_scale(entry):
    tx = entry.make()
    params = _params()
    s1 = s2 = tx.init(params)
    for i in range(3):
        grads = _grads(params, i)
        u1, s1 = tx.update(grads, s1, params)
        u2, s2 = tx.update(jax.tree.map(lambda x: 8.0 * x, grads), s2, params)
        _assert_trees_equal(u1, u2)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.factored],
                         ids=[e.name for e in ENTRIES if e.factored])
def test_factored_state_is_sublinear(entry):
    tx = entry.make()
    params = {"big": jnp.ones((64, 32), jnp.float32)}
    state = tx.init(params)
    size = sum(int(np.size(x)) for x in jax.tree.leaves(state))
    assert size < 64 * 32 // 4, f"{entry.name} keeps {size} state numbers for 2048 parameters"
    updates, _ = tx.update({"big": jnp.full((64, 32), 0.5, jnp.float32)}, state, params)
    assert updates["big"].shape == (64, 32) and bool(jnp.all(jnp.isfinite(updates["big"])))


_MATRIX = (264, 256)   # both dimensions factored by Adafactor; above the trust ratio's recompute size


@by_entry
def test_donated_cpu_step_writes_only_the_expected_temporaries(entry):
    # A structural property of the compiled step, not a timing: the parameter-sized buffers it
    # writes besides the new params and state (temporaries, copies of donated state). Every one
    # costs a pass over the leaf and, on CPU, fresh-page faults; a change that adds one fails here.
    if jax.default_backend() != "cpu":
        pytest.skip("the expected counts describe XLA's CPU backend")
    text = donated_step_text(entry.make(), _MATRIX, jnp.float32)
    found = full_size_temporaries(text, _MATRIX)
    assert len(found) == entry.cpu_step_temporaries, "\n".join(found)


@by_entry
def test_equal_shaped_leaves_share_no_temporary(entry):
    # Two leaves of one shape: XLA merges equal instructions across them, e.g. the broadcast of a
    # scalar that both leaves' reductions use, and a merged broadcast that feeds two reductions is
    # materialised (Adafactor's ε₁ did; the LAMB norms' scalars would). Each leaf may only have
    # its own expected temporaries.
    if jax.default_backend() != "cpu":
        pytest.skip("the expected counts describe XLA's CPU backend")
    params = {"a": jnp.full(_MATRIX, 0.5), "b": jnp.full(_MATRIX, -0.25)}
    grads = {"a": jnp.full(_MATRIX, 0.01), "b": jnp.full(_MATRIX, 0.02)}
    text = compiled_step_text(entry.make(), params, grads)
    found = full_size_temporaries(text, _MATRIX)
    assert len(found) == 2 * entry.cpu_step_temporaries, "\n".join(found)


@by_entry
def test_bfloat16_cpu_step_converts_once_and_updates_moments_in_place(entry):
    # With bfloat16 parameters every use of a gradient or parameter converts it to float32 in
    # its own loop: a conversion shared by a reduction and another loop would be materialised as
    # a float32 array, twice the leaf's bytes. Only the float32 temporaries the math forces remain.
    # The state is bfloat16 too, and the update reads each new moment as stored
    # (numerics.as_stored): recomputing the unrounded moment from the old one instead would make
    # XLA copy every donated moment buffer first.
    if jax.default_backend() != "cpu":
        pytest.skip("the expected counts describe XLA's CPU backend")
    text = donated_step_text(entry.make(), _MATRIX, jnp.bfloat16)
    found = full_size_temporaries(text, _MATRIX, "f32")
    assert len(found) <= entry.cpu_step_temporaries, "\n".join(found)
    found = full_size_temporaries(text, _MATRIX, "bf16")
    assert len(found) == entry.cpu_bf16_step_temporaries, "\n".join(found)
