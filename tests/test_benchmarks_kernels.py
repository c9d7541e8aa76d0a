"""The kernel-by-kernel profiler of benchmarks/kernels.py: HLO parsing and event matching (no
timing assertions)."""

import json

import jax
import jax.numpy as jnp
import pytest

import gradtx
from benchmarks import kernels
from benchmarks.timing import OptimizerStep

_HLO = """HloModule jit_step, is_scheduled=true

%fused_computation (param_0: f32[8,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  ROOT %neg = f32[8,4]{1,0} negate(%param_0)
}

ENTRY %main.12 (p: f32[8,4], codes: u8[16,256], s: s32[]) -> (f32[8,4], u8[16,256]) {
  %p = f32[8,4]{1,0} parameter(0)
  %codes = u8[16,256]{1,0} parameter(1)
  %s = s32[] parameter(2)
  %constant.1 = f32[] constant(0.5)
  %copy.3 = u8[16,256]{1,0} copy(%codes)
  %both = (s32[16,16]{1,0}, bf16[16]{0}) fusion(%codes, %p, %p, %s), kind=kLoop, calls=%fused_computation
  %gte = s32[16,16]{1,0} get-tuple-element(%both), index=0
  %ynn_fusion = f32[] fusion(%constant.1, %gte), kind=kCustom, calls=%fused_computation, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %bitcast.2 = f32[32]{0} bitcast(%p)
  ROOT %tuple = (f32[8,4]{1,0}, u8[16,256]{1,0}) tuple(%p, %copy.3)
}
"""


def test_shape_bytes_reads_arrays_scalars_and_tuples():
    assert kernels.shape_bytes("f32[4096,4096]{1,0}") == 4 * 4096 * 4096
    assert kernels.shape_bytes("s32[]") == 4
    assert kernels.shape_bytes("(s32[16,16]{1,0}, bf16[16]{0})") == 16 * 16 * 4 + 16 * 2
    assert kernels.shape_bytes("pred[3]") == 3


def test_entry_kernels_lists_launched_work_with_its_bytes():
    ks = {k.name: k for k in kernels.entry_kernels(_HLO)}
    # parameters, constants, bitcasts, tuple plumbing launch nothing; the nested computation's
    # instructions are not entry kernels
    assert set(ks) == {"copy.3", "both", "ynn_fusion"}
    assert (ks["copy.3"].opcode, ks["copy.3"].read_bytes, ks["copy.3"].write_bytes) == \
        ("copy", 16 * 256, 16 * 256)
    both = ks["both"]
    # %p is passed twice but read once: distinct operands
    assert both.kind == "kLoop" and both.read_bytes == 16 * 256 + 8 * 4 * 4 + 4
    assert both.write_bytes == 16 * 16 * 4 + 16 * 2
    assert ks["ynn_fusion"].kind == "ynn_fusion"
    assert ks["ynn_fusion"].read_bytes == 4 + 16 * 16 * 4 and ks["ynn_fusion"].write_bytes == 4
    with pytest.raises(ValueError, match="no ENTRY"):
        kernels.entry_kernels("HloModule x")


def test_attach_times_sums_a_kernels_events_per_step_window():
    k = kernels.Kernel("f", "fusion", "kLoop", 8, 8)
    missing = kernels.Kernel("g", "fusion", "kLoop", 8, 8)
    profile = {"steps": [(0, 100), (200, 300)],
               "events": {"f": [(False, 10, 5), (False, 50, 7), (False, 210, 4),
                                (False, 150, 99)]}}        # 150: between steps, not counted
    kernels.attach_times([k, missing], profile)
    assert k.seconds == pytest.approx([12e-9, 4e-9]) and missing.seconds == []
    # device-plane events win over the host's launch events of the same kernel
    k2 = kernels.Kernel("f", "fusion", "kLoop", 8, 8)
    profile["events"]["f"].append((True, 20, 50))
    kernels.attach_times([k2], profile)
    assert k2.seconds == pytest.approx([50e-9])


def test_a_profiled_adamw_step_times_each_of_its_loops():
    params = {"w": jnp.ones((256, 256))}
    grads = {"w": jnp.full((256, 256), 0.5)}
    step = OptimizerStep("adamw", "gradtx", gradtx.adamw(1e-3), gradtx.apply_updates, params,
                         grads)
    ks = kernels.entry_kernels(step.compiled.as_text())
    big = [k for k in ks if k.write_bytes == 256 * 256 * 4]
    assert len(big) >= 1 and all(k.read_bytes >= 2 * 256 * 256 * 4 for k in big)
    step.step()
    profile = kernels.profile_step(step.step, 3)
    assert len(profile["steps"]) == 3
    kernels.attach_times(ks, profile)
    for k in big:                                   # every parameter-sized loop seen each step
        assert len(k.seconds) == 3 and min(k.seconds) > 0
    report = kernels.table(ks, step_s=1e-3)
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| kernel | kind |")
    assert all(any(line.startswith(f"| {k.name} |") for line in rows) for k in big)
    assert "step wall time 1.00 ms" in report
    timed = sum(k.median_s is not None for k in ks)
    short = kernels.table(ks, step_s=None, top=2).splitlines()
    assert sum(line.startswith("| ") and "---" not in line for line in short) == 1 + 2 + 1
    assert any(line.startswith(f"| ({timed - 2} more)") for line in short)


def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert kernels.main(["--optimizer", "sgd_nesterov", "--tree", "leaf1M", "--steps", "2",
                         "--reps", "2", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## gradtx sgd_nesterov on leaf1M") and "GB/s" in text
    data = json.loads(out.read_text())
    assert data["optimizer"] == "sgd_nesterov" and data["step_median_s"] > 0
    timed = [k for k in data["kernels"] if k["write_bytes"] == 1024 * 1024 * 4]
    assert timed and all(len(k["seconds"]) == 2 for k in timed)


def test_optimizer_step_compiles_with_the_given_compiler_options():
    # --compiler-options reaches XLA: Lion's copy of its donated moment goes with region-analysis
    # copy insertion (docs/performance.md). With b1 > b2 Lion's direction reads the old moment
    # after the in-place write (with the default b1 <= b2 it reads the new one: no copy at all).
    if jax.default_backend() != "cpu":
        pytest.skip("describes XLA's CPU copy insertion")
    params = {"w": jnp.ones((256, 256))}
    grads = {"w": jnp.full((256, 256), 0.5)}
    copies = {}
    for label, options in (("default", None), ("options", gradtx.compiler_options("cpu"))):
        step = OptimizerStep(label, "gradtx", gradtx.lion(1e-4, b1=0.95, b2=0.9),
                             gradtx.apply_updates, params,
                             grads, compiler_options=options)
        copies[label] = sum(k.opcode == "copy" and k.write_bytes == 256 * 256 * 4
                            for k in kernels.entry_kernels(step.compiled.as_text()))
    assert copies == {"default": 1, "options": 0}
