"""``gradtx.xla_flags``: what it returns, and that the flags -- which must be set before JAX
starts, so they are checked in a subprocess -- merge AdamW's state writes and parameter update into
one loop, and change every registry optimizer's trajectory (and 8-bit state's) by rounding at most.

Run as a script (``python tests/test_xla_flags.py OUT.npz``) it writes the trajectories of the
same cases, computed under whatever ``XLA_FLAGS`` its environment holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradtx  # noqa: E402
from gradtx import compiler  # noqa: E402
from gradtx.quantization import quantized_state  # noqa: E402
from optimizer_registry import ENTRIES, PROBLEMS  # noqa: E402
from test_compiler_options import _trajectory  # noqa: E402

CPU_FLAGS = ["--xla_cpu_copy_insertion_use_region_analysis=true",
             "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"]


def test_values_per_backend():
    assert gradtx.xla_flags("cpu").split() == CPU_FLAGS
    assert gradtx.xla_flags("CPU") == gradtx.xla_flags("cpu")
    for name in ("gpu", "cuda", "rocm", "tpu"):
        assert gradtx.xla_flags(name) == ""


def test_backend_must_be_named():
    # None would need jax.default_backend(), which starts the backend: too late for the flags
    with pytest.raises(TypeError, match=r"xla_flags: backend=None must be a string"):
        gradtx.xla_flags(None)
    with pytest.raises(ValueError, match=r"xla_flags: backend='metal'.*name the backend"):
        gradtx.xla_flags("metal")


def _cases():
    """(name, optimizer, initial params): every registry optimizer on the quadratic problem, and
    8-bit AdamW (both roundings, both code maps) on a leaf big enough to be quantized."""
    for entry in ENTRIES:
        dtype = jnp.bfloat16 if entry.supports_bf16_convergence else jnp.float32
        yield entry.name, entry.make("quadratic"), PROBLEMS["quadratic"].init(dtype)
    params = {"w": jnp.linspace(-1.0, 1.0, 64 * 128, dtype=jnp.float32).reshape(64, 128),
              "b": jnp.full((128,), 0.5, jnp.float32)}
    for rounding in ("nearest", "stochastic"):
        for code_map in ("dynamic", "float8"):
            yield (f"adamw_8bit_{code_map}_{rounding}",
                   quantized_state(gradtx.adamw(1e-2), rounding=rounding, code_map=code_map),
                   params)


def _multi_output_fusions(hlo_text: str) -> int:
    """Fusions in the entry computation whose result is a tuple (several outputs)."""
    return sum(1 for line in hlo_text.splitlines()
               if " fusion(" in line and line.lstrip().startswith("%")
               and line.split("=", 1)[1].lstrip().startswith("("))


def _adamw_step_hlo() -> str:
    tx = gradtx.adamw(1e-3)
    params = jnp.ones((256, 256), jnp.float32)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params) \
        .compile().as_text()


def _leaves(trajectory):
    return [np.asarray(x) for x in jax.tree.leaves(trajectory)]


def _write(path: str) -> None:
    hlo = _adamw_step_hlo()
    arrays = {}
    manifest = {"mof": _multi_output_fusions(hlo), "loops": compiler._array_loops(hlo, "f32[256,256]"), "cases": {}}
    for name, tx, params in _cases():
        leaves = _leaves(_trajectory(tx, params, None))
        manifest["cases"][name] = [(x.dtype.name, list(x.shape)) for x in leaves]
        for i, x in enumerate(leaves):
            arrays[f"{name}/{i}"] = x.view(np.uint16) if x.dtype.name == "bfloat16" else x
    np.savez(path, manifest=np.asarray(json.dumps(manifest)), **arrays)


# A multiply-add in one loop is contracted to an FMA depending on what else that loop computes, so
# merging loops may move a result by its last bit (float32) or, once rounded to a bfloat16
# parameter, by one bfloat16 step.
_RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -7}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the flags are CPU flags")
def test_flags_merge_the_update_into_the_state_loop_and_change_only_rounding(tmp_path):
    out = tmp_path / "flagged.npz"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=gradtx.xla_flags("cpu"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    flagged = np.load(out)
    manifest = json.loads(str(flagged["manifest"]))
    # the flags are in effect: AdamW's m', v' and p' (computed from the old moments, see
    # gradtx.tree.map_leaves) are one loop with three outputs; this (default) process runs three
    hlo = _adamw_step_hlo()
    assert manifest["mof"] >= 1 and _multi_output_fusions(hlo) == 0
    assert (manifest["loops"], compiler._array_loops(hlo, "f32[256,256]")) == (1, 3)
    names = [name for name, _, _ in _cases()]
    assert sorted(manifest["cases"]) == sorted(names)
    for name, tx, params in _cases():
        leaves = _leaves(_trajectory(tx, params, None))
        assert [[x.dtype.name, list(x.shape)] for x in leaves] == manifest["cases"][name], name
        for i, x in enumerate(leaves):
            got = flagged[f"{name}/{i}"]
            where = f"{name}: leaf {i} of the trajectory under {gradtx.xla_flags('cpu')}"
            if x.dtype.name not in _RTOL:  # counters, 8-bit codes: exactly
                np.testing.assert_array_equal(got, x, err_msg=where)
                continue
            if x.dtype.name == "bfloat16":
                got = got.view(x.dtype)
            np.testing.assert_allclose(got.astype(np.float64), x.astype(np.float64),
                                       rtol=_RTOL[x.dtype.name], atol=1e-7, err_msg=where)


if __name__ == "__main__":
    _write(sys.argv[1])
