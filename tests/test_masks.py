"""gradtx.masks: selectors and labellers resolved against NNX State, Linen dicts and plain trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx
from gradtx import masks

nnx = pytest.importorskip("flax.nnx")


# ---------------------------------------------------------------------------------------------
# Trees


def linen_params():
    return {"params": {
        "embed": {"embedding": jnp.ones((5, 3))},
        "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    }}


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(5, 3, rngs=rngs)
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs)])
        self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.dense(self.embed(ids))
        x = self.LayerNorm(x)
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


def nnx_states():
    model = Net(nnx.Rngs(0))
    variables = nnx.state(model, nnx.Param)
    arrays = nnx.as_pure(variables)
    return model, variables, arrays


def flat(tree):
    return {p: bool(b) for p, b in zip(masks.leaf_paths(tree), jax.tree.leaves(tree))}


# ---------------------------------------------------------------------------------------------
# Paths and patterns


def test_leaf_paths_on_each_tree_kind():
    assert masks.leaf_paths({"a": [jnp.ones(1), (jnp.ones(1),)]}) == ["a/0", "a/1/0"]
    assert "params/Dense_0/kernel" in masks.leaf_paths(linen_params())
    _, variables, arrays = nnx_states()
    expected = ["LayerNorm/bias", "LayerNorm/scale", "dense/bias", "dense/kernel",
                "embed/embedding", "head/kernel", "layers/0/bias", "layers/0/kernel"]
    # the Variable's internal 'value' key is not part of the path, in both forms
    assert sorted(masks.leaf_paths(variables)) == expected
    assert sorted(masks.leaf_paths(arrays)) == expected


def test_patterns_are_position_independent_and_anchorable():
    params = linen_params()
    sel = masks.paths("Dense_0/*")
    assert flat(sel(params)) == {p: p.startswith("params/Dense_0/") for p in masks.leaf_paths(params)}
    assert flat(masks.paths("bias")(params)) == {p: p.endswith("/bias")
                                                 for p in masks.leaf_paths(params)}
    assert flat(masks.paths("/params/embed*")(params))["params/embed/embedding"]
    with pytest.raises(ValueError, match="'/embed\\*' matches no parameter"):
        masks.paths("/embed*")(params)          # anchored at the root: under 'params/' it misses
    # '*' crosses '/'
    assert flat(masks.paths("*/LayerNorm*/scale")(params))["params/LayerNorm_0/scale"]
    # case
    with pytest.raises(ValueError):
        masks.paths("*layernorm*")(params)
    low = masks.paths("*layernorm*", case_sensitive=False)(params)
    assert sum(flat(low).values()) == 2


def test_unmatched_pattern_raises_naming_pattern_and_paths():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError) as err:
        masks.paths("*/kernel", "*/baias")(params)
    msg = str(err.value)
    assert "'*/baias'" in msg and "'dense/bias'" in msg and "strict=False" in msg
    assert flat(masks.paths("*/kernel", "*/baias", strict=False)(params)) == {
        "dense/bias": False, "dense/kernel": True}
    # inside a negation, and through an optimizer's mask: a typo must not disable weight decay
    with pytest.raises(ValueError, match="baias"):
        (~masks.paths("baias"))(params)
    tx = gradtx.adamw(1e-3, weight_decay=0.1, mask=~masks.paths("*/baias"))
    state = tx.init(params)
    with pytest.raises(ValueError, match="baias"):
        tx.update(params, state, params)


def test_rank_where_and_composition():
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "s": jnp.ones(()), "c": jnp.ones((1, 1, 2))}
    assert masks.rank(at_least=2)(params) == {"b": False, "c": True, "s": False, "w": True}
    assert masks.rank(at_most=1)(params) == {"b": True, "c": False, "s": True, "w": False}
    assert masks.rank(2)(params) == {"b": False, "c": False, "s": False, "w": True}

    def is_w(path, leaf):
        return path == "w"

    sel = masks.where(is_w) | masks.rank(0)
    assert sel(params) == {"b": False, "c": False, "s": True, "w": True}
    assert (~sel)(params) == {"b": True, "c": True, "s": False, "w": False}
    assert (masks.rank(at_least=2) & ~masks.paths("c"))(params) == {
        "b": False, "c": False, "s": False, "w": True}
    assert ~~sel == sel
    # values: equal, hashable, readable
    assert masks.paths("a", "b") == masks.paths("a", "b")
    assert hash(masks.paths("a") & masks.rank(1)) == hash(masks.paths("a") & masks.rank(1))
    assert masks.paths("a") != masks.paths("a", strict=False)
    assert repr(masks.paths("x", strict=False) | ~masks.rank(at_least=2)) == \
        "(paths('x', strict=False) | ~rank(at_least=2))"
    assert repr(masks.decay_default()) == "decay_default()"


def test_selectors_on_abstract_and_python_leaves():
    abstract = jax.eval_shape(lambda: {"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    assert masks.decay_default()(abstract) == {"b": False, "w": True}
    assert masks.rank(0)({"x": 1.0, "y": [2.0]}) == {"x": True, "y": [True]}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least one pattern"):
        masks.paths()
    with pytest.raises(TypeError, match="non-empty string"):
        masks.paths(3)
    with pytest.raises(TypeError, match="strict"):
        masks.paths("a", strict="yes")
    with pytest.raises(ValueError, match="equal="):
        masks.rank()
    with pytest.raises(ValueError, match="non-negative"):
        masks.rank(at_least=-1)
    with pytest.raises(TypeError, match="not callable"):
        masks.where(3)
    with pytest.raises(TypeError, match="selector"):
        masks.paths("a") & 3
    with pytest.raises(ValueError, match="overlap"):
        masks.labels({"a": "x"}, overlap="last")
    with pytest.raises(TypeError, match="non-empty dict"):
        masks.labels({})


# ---------------------------------------------------------------------------------------------
# decay_default


def test_decay_default_on_linen_nnx_and_plain():
    got = flat(masks.decay_default()(linen_params()))
    assert got == {"params/Dense_0/bias": False, "params/Dense_0/kernel": True,
                   "params/Dense_1/bias": False, "params/Dense_1/kernel": True,
                   "params/LayerNorm_0/bias": False, "params/LayerNorm_0/scale": False,
                   "params/embed/embedding": True}
    _, variables, arrays = nnx_states()
    expected = {"LayerNorm/bias": False, "LayerNorm/scale": False, "dense/bias": False,
                "dense/kernel": True, "embed/embedding": True, "head/kernel": True,
                "layers/0/bias": False, "layers/0/kernel": True}
    assert flat(masks.decay_default()(variables)) == expected
    assert flat(masks.decay_default()(arrays)) == expected
    # a 2-D parameter inside a norm layer or named bias is spared too
    odd = {"rms_norm": {"weight": jnp.ones((2, 2))}, "proj": {"bias": jnp.ones((2, 2))},
           "proj2": {"kernel": jnp.ones((2, 2))}}
    assert masks.decay_default()(odd) == {"proj": {"bias": False}, "proj2": {"kernel": True},
                                          "rms_norm": {"weight": False}}


# ---------------------------------------------------------------------------------------------
# NNX: Variables at init, arrays at update


def test_nnx_mask_structure_is_a_prefix_of_both_forms():
    _, variables, arrays = nnx_states()
    sel = masks.paths("*/bias")
    m_vars, m_arrays = sel(variables), sel(arrays)
    assert jax.tree.structure(m_vars) == jax.tree.structure(m_arrays)
    assert isinstance(m_vars, nnx.State)
    # the bool sits at the Variable's position: a prefix of the Variable tree and of the arrays
    assert jax.tree.leaves(m_vars) == jax.tree.leaves(m_arrays)
    tx = gradtx.masked(gradtx.scale(0.0), sel)
    state = tx.init(variables)                     # Variables, as nnx.Optimizer calls init
    updates, _ = jax.jit(tx.update)(arrays, nnx.as_pure(state), arrays)
    for path, u in zip(masks.leaf_paths(updates), jax.tree.leaves(updates)):
        assert bool(jnp.all(u == 0)) == path.endswith("bias"), path


def test_nnx_optimizer_with_selector_masks():
    model, _, _ = nnx_states()
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = gradtx.adamw(0.5, weight_decay=0.5, mask=masks.decay_default())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, grads):
        optimizer.update(model, grads)

    step(model, optimizer, zero_grads)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    # zero gradients: Adam's step is 0, so only decayed leaves move (by -lr * wd * p)
    decayed = flat(masks.decay_default()(before))
    for path, b, a in zip(masks.leaf_paths(before), jax.tree.leaves(before),
                          jax.tree.leaves(after)):
        if decayed[path]:
            np.testing.assert_allclose(a, b * (1 - 0.25), rtol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def test_nnx_partition_with_labels_at_init_and_update():
    _, variables, arrays = nnx_states()
    lab = masks.labels({"embed": "embed*", "no_decay": masks.rank(at_most=1)}, default="rest")
    assert set(jax.tree.leaves(lab(variables))) == {"embed", "no_decay", "rest"}
    tx = gradtx.partition({"embed": gradtx.scale_by_learning_rate(0.25),
                           "no_decay": gradtx.scale_by_learning_rate(0.5),
                           "rest": gradtx.scale_by_learning_rate(1.0)}, lab)
    state = tx.init(variables)
    ones = jax.tree.map(jnp.ones_like, arrays)
    updates, _ = jax.jit(tx.update)(ones, nnx.as_pure(state), arrays)
    for path, u in zip(masks.leaf_paths(updates), jax.tree.leaves(updates)):
        expect = -0.25 if path.startswith("embed") else (
            -0.5 if path.endswith(("bias", "scale")) else -1.0)
        np.testing.assert_array_equal(u, jnp.full_like(u, expect), err_msg=path)


# ---------------------------------------------------------------------------------------------
# labels and partition


def test_labels_overlap_default_and_unassigned():
    params = linen_params()
    with pytest.raises(ValueError, match="'params/Dense_0/bias' is selected by the groups 'dense' "
                                         "and 'bias'"):
        masks.labels({"dense": "Dense*", "bias": "bias"}, default="rest")(params)
    first = masks.labels({"dense": "Dense*", "bias": "bias"}, default="rest", overlap="first")
    got = flat_labels(first(params))
    assert got["params/Dense_0/bias"] == "dense" and got["params/LayerNorm_0/bias"] == "bias"
    assert got["params/embed/embedding"] == "rest"
    with pytest.raises(ValueError, match="belong to no group"):
        masks.labels({"dense": "Dense*"})(params)
    with pytest.raises(ValueError, match="'Dnse\\*' matches no parameter"):
        masks.labels({"dense": "Dnse*"}, default="rest")(params)
    assert hash(first) == hash(masks.labels({"dense": "Dense*", "bias": "bias"}, default="rest",
                                            overlap="first"))
    assert repr(first) == ("labels({'dense': paths('Dense*'), 'bias': paths('bias')}, "
                           "default='rest', overlap='first')")


def flat_labels(tree):
    return dict(zip(masks.leaf_paths(tree), jax.tree.leaves(tree)))


def test_partition_per_group_learning_rate_equals_separate_optimizers():
    params = linen_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    lab = masks.labels({"embed": "embed*"}, default="rest")
    tx = gradtx.partition({"embed": gradtx.adam(1e-3), "rest": gradtx.adam(1e-2)}, lab)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    embed_only = gradtx.adam(1e-3)
    u_embed, _ = embed_only.update(grads["params"]["embed"],
                                   embed_only.init(params["params"]["embed"]))
    rest_only = gradtx.adam(1e-2)
    u_rest, _ = rest_only.update(grads["params"]["Dense_0"],
                                 rest_only.init(params["params"]["Dense_0"]))
    np.testing.assert_array_equal(updates["params"]["embed"]["embedding"], u_embed["embedding"])
    np.testing.assert_array_equal(updates["params"]["Dense_0"]["kernel"], u_rest["kernel"])
    # each group's state holds only its own leaves
    assert isinstance(state.inner_states["embed"][0].mu["params"]["Dense_0"]["kernel"],
                      gradtx.MaskedNode)


def test_strict_selector_inside_partition_sees_only_its_group():
    params = {"embed": jnp.ones((2, 2)), "w": jnp.ones((2, 2))}
    lab = {"embed": "a", "w": "b"}
    typo_free = gradtx.masked(gradtx.scale(0.0), masks.paths("embed"))
    tx = gradtx.partition({"a": typo_free, "b": typo_free}, lab)
    with pytest.raises(ValueError, match="strict=False"):
        tx.init(params)                        # group 'b' has no 'embed'
    relaxed = gradtx.masked(gradtx.scale(0.0), masks.paths("embed", strict=False))
    tx = gradtx.partition({"a": relaxed, "b": relaxed}, lab)
    u, _ = tx.update(params, tx.init(params))
    assert u["embed"].sum() == 0 and u["w"].sum() == 4


# ---------------------------------------------------------------------------------------------
# Properties


_names = st.sampled_from(["kernel", "bias", "scale", "embedding", "w"])


@st.composite
def trees(draw):
    n = draw(st.integers(1, 4))
    tree = {}
    for i in range(n):
        leaves = draw(st.dictionaries(_names, st.integers(0, 3), min_size=1, max_size=3))
        tree[f"layer{i}"] = {k: jnp.ones((2,) * r) for k, r in leaves.items()}
    return tree


@settings(max_examples=20, deadline=None)
@given(trees())
def test_selector_algebra_and_decay_rule(tree):
    paths = masks.leaf_paths(tree)
    everything = masks.paths("*")
    assert all(jax.tree.leaves(everything(tree)))
    s = masks.rank(at_least=2)
    assert all(jax.tree.leaves((s | ~s)(tree)))
    assert not any(jax.tree.leaves((s & ~s)(tree)))
    decay = flat(masks.decay_default()(tree))
    for path, leaf in zip(paths, jax.tree.leaves(tree)):
        assert decay[path] == (leaf.ndim >= 2 and not path.endswith("/bias"))
    # the mask has exactly the tree's structure and is a valid gradtx.masked mask
    mask = masks.decay_default()(tree)
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    u, _ = gradtx.masked(gradtx.scale(0.0), masks.decay_default()).update(
        tree, gradtx.masked(gradtx.scale(0.0), masks.decay_default()).init(tree))
    for path, leaf in zip(paths, jax.tree.leaves(u)):
        assert bool(jnp.all(leaf == 0)) == decay[path]
