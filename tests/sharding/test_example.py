"""Smoke test of examples/sharded_training.py in its --tiny mode (8 simulated CPU devices)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_sharded_training_example_tiny():
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_NUMPY_DTYPE_PROMOTION="strict",
               JAX_NUMPY_RANK_PROMOTION="raise",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "examples/sharded_training.py", "--tiny"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "mesh: {'data': 4, 'fsdp': 2} on 8 cpu devices" in out, out
    params = re.search(r"parameters:\s+([\d.]+) MiB per device \(unsharded\s+([\d.]+) MiB", out)
    state = re.search(r"optimizer state:\s+([\d.]+) MiB per device \(unsharded\s+([\d.]+) MiB", out)
    assert params and state, out
    # FSDP halves the parameters; ZeRO on top leaves ~1/8 of the state per device.
    assert float(params.group(1)) < 0.6 * float(params.group(2)), out
    assert float(state.group(1)) < 0.2 * float(state.group(2)), out
    assert "matches the single-device run" in out, out
