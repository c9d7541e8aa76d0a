"""gradtx.flatten: the flattened (one buffer per dtype) path equals the plain path.

Bit-identity of the updates over several steps for elementwise optimizers on random trees of mixed
shapes and dtypes, O(#dtypes) state arrays (and one offset scalar per leaf), the transform contract
(jit, eval_shape, no recompilation, hashable), Flax nnx.Optimizer, rejection of per-leaf-norm
transforms and tree masks, and structural checks of the compiled step (far fewer instructions than
the plain path; same-shaped leaves share one computation).
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from compilations import count_compilations  # noqa: E402
from exact_checks import same_shaped_step_computations  # noqa: E402
from gradtx.fastpath import FlattenState, flatten  # noqa: E402

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (1,), (6, 6), (0,)]


def _tree(key, dtypes, scale=1.0):
    keys = jax.random.split(key, len(SHAPES))
    out = {}
    for i, (k, shape) in enumerate(zip(keys, SHAPES)):
        dtype = dtypes[i % len(dtypes)]
        out[f"l{i}"] = (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    out["nested"] = [out.pop("l5"), {"x": out.pop("l6")}]
    return out


DTYPES = {"f32": (jnp.float32,), "bf16": (jnp.bfloat16,), "mixed": (jnp.float32, jnp.bfloat16)}

OPTIMIZERS = {
    "sgd_nesterov": lambda: gradtx.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: gradtx.adam(1e-2),
    "adamw": lambda: gradtx.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: gradtx.lion(1e-3, weight_decay=0.1),
    "adabelief": lambda: gradtx.adabelief(1e-2),
    "rmsprop": lambda: gradtx.rmsprop(1e-2, momentum=0.5),
    "adagrad": lambda: gradtx.adagrad(1e-1),
    "inject_adamw": lambda: gradtx.inject_hyperparams(gradtx.adamw(1e-2)),
}


def _bits_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.float32)))


def _close(a, b):
    """Within one rounding of each dtype (XLA's CPU codegen is fusion-dependent, see below)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        tol = 1.6e-2 if x.dtype == jnp.bfloat16 else 1e-6
        ref = np.asarray(y.astype(jnp.float32))
        # atol on the leaf's scale: an element near zero that is the difference of O(1) terms
        # carries the rounding of those terms, not of itself
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        np.testing.assert_allclose(np.asarray(x.astype(jnp.float32)), ref, rtol=tol,
                                   atol=tol * max(scale, 1e-3))


def _steps(tx, params, steps=3):
    state = tx.init(params)
    outs = []
    for t in range(steps):
        grads = jax.tree.map(lambda p, t=t: (jnp.sin(p.astype(jnp.float32) * (t + 1.5)))
                             .astype(p.dtype), params)
        updates, state = tx.update(grads, state, params)
        outs.append(updates)
        params = gradtx.apply_updates(params, updates)
    return outs, params


def _run(tx, params, steps=3):
    return jax.jit(lambda p: _steps(tx, p, steps))(params)


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adam", "adamw", "lion"])
def test_bit_identical_to_plain_path_op_by_op(opt):
    # Eagerly (op by op) the flat path performs the same float operations on the same values.
    # (Not every optimizer: XLA's CPU kernels for 0-d arrays may round division/sqrt differently
    # from the vectorised loop the same element takes inside a flat buffer.)
    params = _tree(jax.random.key(7), DTYPES["mixed"])
    _bits_equal(_steps(flatten(OPTIMIZERS[opt]()), params), _steps(OPTIMIZERS[opt](), params))


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_equal_to_plain_path_under_jit(opt, dtypes):
    # Under jit XLA fuses the two programs differently and its CPU code generation (contraction,
    # vectorised division/sqrt) may differ in the last bit: equal within one rounding.
    # a stable seed per case (hash() of a str changes with PYTHONHASHSEED from run to run)
    params = _tree(jax.random.key(zlib.crc32(f"{opt}/{dtypes}".encode()) % 1000), DTYPES[dtypes])
    _close(_run(flatten(OPTIMIZERS[opt]()), params), _run(OPTIMIZERS[opt](), params))


def test_clip_by_global_norm_is_equal_up_to_summation_order():
    params = _tree(jax.random.key(3), DTYPES["mixed"], scale=10.0)
    make = lambda: gradtx.chain(gradtx.clip_by_global_norm(1.0), gradtx.adam(1e-2))  # noqa: E731
    (flat_u, _), (plain_u, _) = _run(flatten(make()), params), _run(make(), params)
    for a, b in zip(jax.tree.leaves(flat_u), jax.tree.leaves(plain_u)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-2 if a.dtype == jnp.bfloat16 else 1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [10, 40])
def test_state_has_one_leaf_per_dtype_and_moment(n):
    params = {f"p{i}": jnp.zeros((3,), jnp.float32 if i % 2 else jnp.bfloat16) for i in range(n)}
    state = flatten(gradtx.adamw(1e-3)).init(params)
    assert isinstance(state, FlattenState)
    # counters + mu/nu per dtype (2 each): independent of n
    assert len(jax.tree.leaves(state.inner_state)) <= 8
    # one int32 scalar per leaf (in jax.tree.leaves order): its start in its dtype's buffer
    starts, expected = {}, []
    for leaf in jax.tree.leaves(params):
        expected.append(starts.get(leaf.dtype, 0))
        starts[leaf.dtype] = expected[-1] + 3
    assert [int(o) for o in state.offsets] == expected
    assert sorted(set(expected)) == [3 * k for k in range(n // 2)]
    assert all(o.shape == () and o.dtype == jnp.int32 for o in state.offsets)
    mu = state.inner_state[0].mu
    assert {k: v.shape for k, v in mu.items()} == {"bfloat16": (3 * (n // 2),),
                                                   "float32": (3 * (n // 2),)}
    assert mu["bfloat16"].dtype == jnp.bfloat16


def test_eval_shape_and_abstract_params_match_init():
    params = _tree(jax.random.key(1), DTYPES["mixed"])
    tx = flatten(gradtx.adamw(1e-3))
    real = jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(params))
    shaped = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(tx.init, params))
    abstract = jax.tree.map(lambda x: (x.shape, x.dtype),
                            tx.init(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                 params)))
    assert real == shaped == abstract


def test_no_recompilation_and_value_semantics():
    traces = []
    params = _tree(jax.random.key(2), DTYPES["mixed"])

    @functools.partial(jax.jit, static_argnums=0)
    def step(tx, params, state):
        traces.append(1)
        updates, state = tx.update(params, state, params)
        return gradtx.apply_updates(params, updates), state

    tx = flatten(gradtx.adamw(1e-3))
    state = tx.init(params)
    for _ in range(3):
        params, state = step(tx, params, state)
    params, state = step(flatten(gradtx.adamw(1e-3)), params, state)  # equal value: cache hit
    assert len(traces) == 1
    assert tx == flatten(gradtx.adamw(1e-3)) and hash(tx) == hash(flatten(gradtx.adamw(1e-3)))
    assert tx != flatten(gradtx.adamw(2e-3))
    assert repr(flatten(gradtx.scale(2.0))) == "flatten(scale(factor=2.0))"


def test_extra_kwargs_are_forwarded():
    seen = {}

    @gradtx.transform
    class spy(gradtx.Transform):
        def init(self, params):
            return gradtx.EmptyState()

        def update(self, updates, state, params=None, **extra):
            seen.update(extra)
            return updates, state

    tx = flatten(spy())
    tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}), value=3.0)
    assert seen == {"value": 3.0}


@pytest.mark.parametrize("make", [
    lambda: gradtx.lamb(1e-3), lambda: gradtx.lars(1e-3), lambda: gradtx.adafactor(1e-3),
    lambda: gradtx.chain(gradtx.adaptive_grad_clip(0.01), gradtx.sgd(0.1)),
    lambda: gradtx.adamw(1e-3, mask={"w": True, "b": False}),
    lambda: gradtx.masked(gradtx.adam(1e-3), {"w": True, "b": False}),
    lambda: gradtx.inject_hyperparams(gradtx.chain(gradtx.clip_by_block_rms(1.0))),
], ids=["lamb", "lars", "adafactor", "agc", "decay_mask", "masked", "nested_block_rms"])
def test_per_leaf_transforms_and_tree_masks_are_rejected(make):
    with pytest.raises(ValueError, match="flatten"):
        flatten(make())


def test_flatten_inside_partition_keeps_masked_decay():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "v": jnp.full((4,), 2.0)}
    labels = {"w": "decay", "b": "rest", "v": "decay"}
    plain = gradtx.partition({"decay": gradtx.adamw(0.1, weight_decay=0.5),
                              "rest": gradtx.adam(0.1)}, labels)
    flat = gradtx.partition({"decay": flatten(gradtx.adamw(0.1, weight_decay=0.5)),
                             "rest": flatten(gradtx.adam(0.1))}, labels)
    _bits_equal(_steps(flat, params), _steps(plain, params))


def test_dtype_and_structure_mismatch_errors():
    tx = flatten(gradtx.adam(1e-3))
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(TypeError, match="dtype"):
        tx.update({"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(3)}, state, params)
    with pytest.raises(gradtx.TreeMismatchError):
        tx.update({"a": jnp.ones(2)}, state, params)
    with pytest.raises(gradtx.TreeMismatchError):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(4)}, state)


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 8, rngs=rngs)
            self.b = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    x = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(8, 3)
    y = jnp.sum(x, axis=1, keepdims=True)

    def train(tx):
        model = MLP(nnx.Rngs(0))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            opt.update(model, grads)
            return loss

        losses = [float(step(model, opt)) for _ in range(5)]
        return losses, nnx.state(model, nnx.Param), opt

    flat_losses, flat_params, opt = train(flatten(gradtx.adamw(1e-2)))
    plain_losses, plain_params, _ = train(gradtx.adamw(1e-2))
    np.testing.assert_allclose(flat_losses, plain_losses, rtol=1e-5)
    assert flat_losses[-1] < flat_losses[0]
    _close(flat_params, plain_params)
    # O(1) arrays, not O(#params): besides the flat moments only scalars (counts, offsets)
    assert sum(np.ndim(x) > 0 for x in jax.tree.leaves(nnx.state(opt.opt_state))) <= 4


def _compiled_step_text(tx, n):
    params = {f"p{i:03d}": jnp.full((4, 4), 0.1 * (i + 1), jnp.float32) for i in range(n)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    state = tx.init(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


def test_compiled_step_is_structurally_smaller():
    n = 60
    flat = _compiled_step_text(flatten(gradtx.adamw(1e-3)), n)
    plain = _compiled_step_text(gradtx.adamw(1e-3), n)
    fusions = lambda text: text.count(" fusion(")  # noqa: E731
    # the plain step has several loops per leaf; the flat one at most one per leaf (the split)
    assert fusions(plain) >= 2.5 * n
    assert fusions(flat) <= n + 10
    # parameters of the entry computation: params, grads and one offset scalar per leaf, against
    # params, grads and two moments per leaf
    entry = lambda text: text.split("ENTRY")[1].split("\n}")[0]  # noqa: E731
    assert entry(flat).count("parameter(") <= 3 * n + 10 < entry(plain).count("parameter(")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_shaped_leaves_share_their_compiled_split(dtype):
    # Each leaf's piece is cut out of the flat buffer at a position read from the state, not a
    # constant: XLA's CPU compiler compiles every distinct fused computation on its own (~10 ms
    # each), so constant positions made each leaf's parameter update a computation of its own
    # (1,000 leaves of 64x64 compiled in ~12 s instead of ~2 s). With 6 leaves as with 2
    # the step holds the same computations.
    tx = flatten(gradtx.adamw(1e-3, weight_decay=0.1))
    assert (same_shaped_step_computations(tx, 6, (16, 8), dtype)
            == same_shaped_step_computations(tx, 2, (16, 8), dtype))


def test_offsets_are_checked():
    tx = flatten(gradtx.adam(1e-3))
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    for bad in (state.offsets[:1], (), None, (jnp.int32(0), jnp.zeros(2, jnp.int32)),
                (jnp.int32(0), jnp.float32(2.0))):
        with pytest.raises(gradtx.TreeMismatchError, match="state.offsets.*flatten.init"):
            tx.update(params, state._replace(offsets=bad), params)


def test_buffers_too_long_for_int32_positions_are_cut_at_constant_positions():
    # a dtype whose leaves hold more than 2**31 - 1 elements in all cannot be indexed with int32
    # positions: its leaves get no offset and are sliced at constant positions (abstract arrays
    # only: nothing of that size is allocated)
    big = jax.ShapeDtypeStruct((2**30,), jnp.bfloat16)
    params = {"a": big, "b": big, "c": jax.ShapeDtypeStruct((4,), jnp.float32)}
    tx = flatten(gradtx.sgd(0.1))
    state = tx.init(params)
    assert state.offsets[:2] == (None, None) and int(state.offsets[2]) == 0
    jaxpr = str(jax.make_jaxpr(lambda g, s: tx.update(g, s))(params, state))
    assert jaxpr.count("dynamic_slice") == 1 and " slice[" in jaxpr


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adamw", "lion", "adabelief"])
def test_elementwise_optimizer_on_raveled_params_matches_the_tree(opt):
    # docs/performance.md, "Many leaves: keep the parameters flat": the parameters live as one
    # ravel_pytree buffer, the loss unravels them inside the donated jitted step, and the
    # optimizer sees one gradient buffer; the trained parameters equal the tree path's
    from jax.flatten_util import ravel_pytree
    params = _tree(jax.random.key(11), DTYPES["f32"])
    x = jnp.linspace(-1.0, 1.0, 7)

    def loss(p):
        return sum(jnp.sum(jnp.tanh(leaf * x[: leaf.size].sum() + 0.3) ** 2)
                   for leaf in jax.tree.leaves(p))

    def train(params, loss, steps=4):
        tx = OPTIMIZERS[opt]()

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(p, s):
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return gradtx.apply_updates(p, updates), s
        state = tx.init(params)
        for _ in range(steps):
            params, state = step(params, state)
        return params, state

    flat, unravel = ravel_pytree(params)
    flat_out, flat_state = train(jnp.array(flat), lambda f: loss(unravel(f)))
    tree_out, _ = train(jax.tree.map(jnp.array, params), loss)
    assert flat_out.shape == flat.shape
    assert all(leaf.ndim <= 1 for leaf in jax.tree.leaves(flat_state))   # no per-leaf state
    _close(unravel(flat_out), tree_out)
    assert not np.allclose(np.asarray(flat_out), np.asarray(flat))        # it trained


def test_init_and_eager_update_compile_independently_of_the_leaf_count():
    """Outside ``jit`` the concatenation and the split are one compiled program per list of
    shapes, not one per new leaf shape (op by op, 200 differently shaped leaves took 3.5 s to
    initialise and 12 s for one eager update); the number of compilations does not grow with the
    number of leaves."""
    def compiles(n, first):
        # shapes that no other test (and no other call here) uses: nothing is cached for them
        params = {f"w{i}": jnp.ones((51 + first + i, 3 + i % 3)) for i in range(n)}
        grads = jax.tree.map(lambda x: 0.5 * x, params)
        jax.block_until_ready((params, grads))
        plain = gradtx.adamw(1e-3)
        tx = flatten(plain)
        with count_compilations() as count:
            state = tx.init(params)
            updates, state = tx.update(grads, state, params)
            jax.block_until_ready((updates, state))
        plain_updates, _ = plain.update(grads, plain.init(params), params)
        _bits_equal(updates, plain_updates)
        return count[0]

    compiles(2, first=300)     # warm-up: the inner AdamW's shape-independent scalar programs
    assert compiles(16, first=100) == compiles(4, first=200)
