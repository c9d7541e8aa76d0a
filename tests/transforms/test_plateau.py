"""reduce_on_plateau: torch ReduceLROnPlateau parity (alignment pinned), errors, jit, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gradtx

torch = pytest.importorskip("torch")


def torch_lrs(values, lr, **kwargs):
    """The lr torch uses at each optimizer step when scheduler.step(loss) follows optimizer.step()."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    used = []
    for v in values:
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(v)
    return np.asarray(used), sched


def gradtx_scales(tx, values):
    @jax.jit
    def run(values):
        def body(state, v):
            u, state = tx.update(jnp.ones((), jnp.float32), state, value=v)
            return state, (u, state.scale)
        return jax.lax.scan(body, tx.init(jnp.zeros(())), values)

    state, (applied, scales) = run(jnp.asarray(values, jnp.float32))
    return np.asarray(applied, np.float64), state


# integer losses and thresholds far from making `best·(1 ± thr)` an integer: no float32/float64 ties
@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=st.lists(st.integers(1, 40), min_size=1, max_size=120),
       factor=st.sampled_from([0.5, 0.1, 0.25, 0.75]), patience=st.integers(0, 6),
       threshold_mode=st.sampled_from(["rel", "abs"]), cooldown=st.integers(0, 4),
       mode=st.sampled_from(["min", "max"]), min_scale=st.sampled_from([0.0, 0.01, 0.3]),
       thr_index=st.integers(0, 2))
def test_matches_torch(values, factor, patience, threshold_mode, cooldown, mode, min_scale,
                       thr_index):
    lr = 0.5
    threshold = ([0.0, 1e-4, 0.0137] if threshold_mode == "rel" else [0.0, 0.5, 2.5])[thr_index]
    values = [float(v) for v in values]
    expected, sched = torch_lrs(values, lr, factor=factor, patience=patience, threshold=threshold,
                                threshold_mode=threshold_mode, cooldown=cooldown, mode=mode,
                                min_lr=min_scale * lr)
    tx = gradtx.reduce_on_plateau(factor=factor, patience=patience, threshold=threshold,
                                  threshold_mode=threshold_mode, cooldown=cooldown, mode=mode,
                                  min_scale=min_scale)
    applied, state = gradtx_scales(tx, values)
    # the update at step k is scaled by the lr torch's optimizer.step() used at step k
    np.testing.assert_allclose(lr * applied, expected, rtol=1e-6)
    np.testing.assert_allclose(lr * float(state.scale), sched.get_last_lr()[0], rtol=1e-6)
    assert float(state.best_value) == sched.best
    assert int(state.plateau_count) == sched.num_bad_epochs
    assert int(state.cooldown_count) == sched.cooldown_counter


def test_alignment_new_scale_applies_from_next_update():
    tx = gradtx.reduce_on_plateau(factor=0.5, patience=0)
    state = tx.init(jnp.zeros(1))
    u, state = tx.update(jnp.ones(1), state, value=1.0)   # first value: best
    u, state = tx.update(jnp.ones(1), state, value=1.0)   # no improvement: reduce after this one
    assert u.tolist() == [1.0] and float(state.scale) == 0.5
    u, state = tx.update(jnp.ones(1), state, value=0.1)   # improves, but scale already 0.5
    assert u.tolist() == [0.5] and float(state.scale) == 0.5


def test_missing_value_is_a_clear_error():
    tx = gradtx.reduce_on_plateau()
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    with pytest.raises(ValueError, match="scalar"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), value=jnp.ones(3))


def test_validation_and_value_semantics():
    with pytest.raises(ValueError, match="factor"):
        gradtx.reduce_on_plateau(factor=1.0)
    with pytest.raises(ValueError, match="threshold_mode"):
        gradtx.reduce_on_plateau(threshold_mode="relative")
    with pytest.raises(ValueError, match="mode"):
        gradtx.reduce_on_plateau(mode="minimum")
    with pytest.raises(TypeError, match="patience"):
        gradtx.reduce_on_plateau(patience=1.5)
    assert gradtx.reduce_on_plateau(patience=3) == gradtx.reduce_on_plateau(patience=3)
    assert hash(gradtx.reduce_on_plateau(patience=3)) == hash(gradtx.reduce_on_plateau(patience=3))
    assert repr(gradtx.reduce_on_plateau(patience=3)) == "reduce_on_plateau(patience=3)"


def test_state_is_named_and_scale_readable_and_dtypes_kept():
    tx = gradtx.reduce_on_plateau()
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    state = tx.init(params)
    assert state._fields == ("scale", "best_value", "plateau_count", "cooldown_count",
                             "accumulated_value", "accumulation_count")
    assert state.scale.dtype == jnp.float32 and float(state.scale) == 1.0
    u, _ = jax.jit(tx.update)({"w": jnp.ones(3, jnp.bfloat16)}, state, value=jnp.float32(2.0))
    assert u["w"].dtype == jnp.bfloat16
    assert jax.tree.structure(jax.eval_shape(tx.init, params)) == jax.tree.structure(state)


def test_accumulation_evaluates_the_mean_every_k_updates():
    k = 3
    values = [5.0, 1.0, 3.0, 4.0, 4.0, 4.0, 2.0, 8.0, 2.0, 9.0, 0.0, 3.0]
    tx = gradtx.reduce_on_plateau(factor=0.5, patience=0, accumulation_size=k)
    applied, state = gradtx_scales(tx, values)
    means = np.asarray(values).reshape(-1, k).mean(1)          # 3, 4, 4, 4
    expected_epoch, _ = torch_lrs(list(means), 1.0, factor=0.5, patience=0)
    # the scale changes only right after each k-th update
    np.testing.assert_array_equal(applied, np.repeat(expected_epoch, k))
    assert int(state.accumulation_count) == 0 and float(state.accumulated_value) == 0.0
