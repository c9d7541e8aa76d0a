"""Where a compiled optimizer step spends its time, kernel by kernel.

    python -m benchmarks.kernels --optimizer adamw --tree leaf16M
    python -m benchmarks.kernels --optimizer adamw_8bit_float8 --compiler-options
    python -m benchmarks.kernels --optimizer adafactor --optax          # Optax's step instead
    python -m benchmarks.kernels --optimizer lion --json lion.json

The step is the harness's (``update`` + ``apply_updates``, params and state donated, optionally
compiled with :func:`gradtx.compiler_options`). It is run under ``jax.profiler`` and every kernel
of the optimized HLO -- each fusion, copy or library call XLA launches -- is matched by name to the
profiler's events. For each kernel the table gives:

* what it moves: the bytes of its distinct operands (``read MB``) and of its result (``write MB``),
  from the shapes in the optimized HLO. A fusion that reads a 4096x4096 float32 gradient reads
  64 MiB, whatever it computes from it; a scalar operand counts 4 bytes.
* its time: the median over the profiled steps of the kernel's wall time (summed if it ran more
  than once in a step), and ``GB/s`` = (read + write) / time: how close that one loop comes to the
  machine's memory bandwidth (the harness's floor measures the same for a whole step).
* ``% of kernels``: its share of the summed kernel time.

The footer gives the step's median wall time measured without the profiler and the summed kernel
time; kernels that XLA runs concurrently (independent loops on a CPU with several cores, YNNPACK
reductions) make the sum exceed the wall time. ``copies`` counts the ``copy`` kernels: a copy of a
donated buffer is a full extra pass, the sign that XLA could not update that buffer in place
(docs/performance.md, "Compile with gradtx.compiler_options()").

No wall-clock time is asserted anywhere; tests check the parsing and the matching only.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import statistics
import sys
import tempfile

import jax

# instructions that are not kernels: they name, slice or bundle buffers without launching work
_NOT_KERNELS = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple",
                          "opt-barrier", "after-all", "partition-id", "replica-id"})
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# "%name = <shape> opcode(operands), attributes" (ROOT optional); the shape may be a tuple
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_CUSTOM_KIND = re.compile(r'"kind"\s*:\s*"([\w]+)"')


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape such as ``f32[4096,4096]{1,0}`` or ``(s32[], u8[16,256]{1,0})``."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class Kernel:
    """One kernel of the optimized HLO's entry computation."""

    name: str
    opcode: str                  # fusion, copy, custom-call, ...
    kind: str                    # fusion kind (kLoop, kInput, kCustom/__ynn_fusion, ...) or opcode
    read_bytes: int              # distinct operands
    write_bytes: int             # the result
    seconds: list = dataclasses.field(default_factory=list)   # per profiled step

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def entry_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the entry computation of an optimized HLO module, with the bytes they move."""
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("entry_kernels: no ENTRY computation in the HLO text; pass "
                         "compiled.as_text() of an optimized (compiled) module.")
    lines = hlo_text[start + 1:].splitlines()
    sizes: dict[str, int] = {}
    kernels: list[Kernel] = []
    for line in lines[1:]:
        if line.startswith("}"):
            break
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        sizes[name] = shape_bytes(shape)
        if opcode in _NOT_KERNELS:
            continue
        # operands end at the first ")" that closes the call; attributes follow
        depth, end = 1, len(rest)
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        operands = dict.fromkeys(_OPERAND.findall(rest[:end]))
        kind = opcode
        if opcode == "fusion":
            fk = _FUSION_KIND.search(rest[end:])
            kind = fk.group(1) if fk else "fusion"
            ck = _CUSTOM_KIND.search(rest[end:])
            if ck and kind == "kCustom":
                kind = ck.group(1).strip("_")
        kernels.append(Kernel(name, opcode, kind,
                              read_bytes=sum(sizes.get(o, 0) for o in operands),
                              write_bytes=sizes[name]))
    return kernels


def profile_step(step, n_steps: int) -> dict:
    """Run ``step()`` ``n_steps`` times under ``jax.profiler``; the events of the run, by name,
    and each step's ``(start, end)`` window (ns, profiler clock), for :func:`attach_times`."""
    with tempfile.TemporaryDirectory(prefix="gradtx-kernels-") as logdir:
        jax.profiler.start_trace(logdir)
        try:
            for _ in range(n_steps):
                with jax.profiler.TraceAnnotation("gradtx_kernels_step"):
                    step()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError("profile_step: jax.profiler wrote no trace; is profiling "
                               "available in this jaxlib?")
        from jax.profiler import ProfileData
        data = ProfileData.from_file(paths[0])
        events: dict = {}
        steps = []
        for plane in data.planes:
            on_device = plane.name.startswith("/device:")
            for line in plane.lines:
                for ev in line.events:
                    if ev.name == "gradtx_kernels_step":
                        steps.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    else:
                        events.setdefault(ev.name, []).append(
                            (on_device, ev.start_ns, ev.duration_ns))
    return {"events": events, "steps": sorted(steps)}


def attach_times(kernels: list[Kernel], profile: dict) -> None:
    """Fill each kernel's per-step seconds from :func:`profile_step`'s events: the kernel's events
    that start inside a step's window, summed per step (device-plane events when there are any)."""
    steps = profile["steps"]
    for k in kernels:
        events = profile["events"].get(k.name, [])
        if any(on_device for on_device, _, _ in events):
            events = [e for e in events if e[0]]
        per_step = [0.0] * len(steps)
        seen = [False] * len(steps)
        for _, start, duration in events:
            for i, (lo, hi) in enumerate(steps):
                if lo <= start <= hi:
                    per_step[i] += duration * 1e-9
                    seen[i] = True
                    break
        k.seconds = [s for s, hit in zip(per_step, seen) if hit]


def table(kernels: list[Kernel], step_s: float | None, top: int | None = None,
          profiled_step_s: float | None = None) -> str:
    """The Markdown report: kernels by time, then the totals."""
    timed = [k for k in kernels if k.median_s is not None]
    total = sum(k.median_s for k in timed)
    rows = sorted(timed, key=lambda k: -k.median_s)
    untimed = [k for k in kernels if k.median_s is None]
    shown = rows if top is None else rows[:top]
    out = ["| kernel | kind | read MB | write MB | ms | GB/s | % of kernels |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for k in shown:
        moved = k.read_bytes + k.write_bytes
        gbs = moved / k.median_s / 1e9 if k.median_s > 0 else float("nan")
        out.append(f"| {k.name} | {k.kind} | {k.read_bytes / 2**20:.1f} | "
                   f"{k.write_bytes / 2**20:.1f} | {k.median_s * 1e3:.3f} | {gbs:.1f} | "
                   f"{100 * k.median_s / total if total else 0:.1f} |")
    if len(shown) < len(rows):
        rest = sum(k.median_s for k in rows[len(shown):])
        out.append(f"| ({len(rows) - len(shown)} more) | | | | {rest * 1e3:.3f} | | "
                   f"{100 * rest / total if total else 0:.1f} |")
    copies = sum(k.opcode == "copy" for k in kernels)
    out.append("")
    out.append(f"- kernels: {len(kernels)} ({copies} copies); summed kernel time "
               f"{total * 1e3:.2f} ms per step"
               + (f"; step wall time {step_s * 1e3:.2f} ms (median, without the profiler)"
                  if step_s is not None else "")
               + (f", {profiled_step_s * 1e3:.2f} ms under it" if profiled_step_s is not None
                  else ""))
    if untimed:
        out.append(f"- not seen in the profile: {', '.join(k.name for k in untimed[:8])}"
                   + (" ..." if len(untimed) > 8 else "")
                   + " (kernels XLA ran inline or skipped, e.g. empty or scalar work)")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# command line


def _parse_args(argv):
    from benchmarks.suite import SPECS
    from benchmarks.trees import ALL_TREES
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="adamw", choices=sorted(SPECS),
                   help="an optimizer of the harness (benchmarks/suite.py; default adamw)")
    p.add_argument("--tree", default="leaf16M", choices=sorted(ALL_TREES),
                   help="a tree of the harness (default leaf16M, one 4096x4096 leaf)")
    p.add_argument("--optax", action="store_true", help="profile the Optax peer instead")
    p.add_argument("--compiler-options", action="store_true",
                   help="compile with gradtx.compiler_options() (region-analysis copy insertion)")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    p.add_argument("--reps", type=int, default=20,
                   help="timed steps without the profiler, half before and half after it "
                        "(default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--top", type=int, default=20, help="rows to show (default 20; 0: all)")
    p.add_argument("--json", metavar="FILE", help="also write the kernels as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    import gradtx
    from benchmarks import suite, trees
    from benchmarks.timing import OptimizerStep, time_once

    spec = suite.SPECS[args.optimizer]
    if args.optax:
        if spec.make_optax is None:
            print(f"{args.optimizer} has no Optax peer.", file=sys.stderr)
            return 2
        import optax
        tx, apply_updates = spec.make_optax(optax), optax.apply_updates
    else:
        tx, apply_updates = spec.make_gradtx(gradtx), gradtx.apply_updates
    shape_tree = trees.ALL_TREES[args.tree].shape_tree()
    params = trees.materialize(shape_tree, seed=0, scale=0.02)
    grads = trees.materialize(shape_tree, seed=1, scale=0.01)
    who = "Optax" if args.optax else "gradtx"
    options = gradtx.compiler_options() if args.compiler_options else None
    candidate = OptimizerStep(args.optimizer, who, tx, apply_updates, params, grads,
                              compiler_options=options)
    kernels = entry_kernels(candidate.compiled.as_text())
    for _ in range(args.warmup):
        candidate.step()
    walls = [time_once(candidate.step) for _ in range(args.reps - args.reps // 2)]
    profile = profile_step(candidate.step, args.steps)
    walls += [time_once(candidate.step) for _ in range(args.reps // 2)]
    attach_times(kernels, profile)
    windows = [(hi - lo) * 1e-9 for lo, hi in profile["steps"]]
    extra = ", compiler_options()" if args.compiler_options else ""
    print(f"## {who} {args.optimizer} on {args.tree} ({jax.default_backend()}{extra})\n")
    print(table(kernels, statistics.median(walls), top=args.top or None,
                profiled_step_s=statistics.median(windows) if windows else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"optimizer": args.optimizer, "tree": args.tree, "peer": who,
                       "compiler_options": bool(args.compiler_options),
                       "step_median_s": statistics.median(walls),
                       "kernels": [dataclasses.asdict(k) for k in kernels]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
