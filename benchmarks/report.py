"""Markdown tables, machine description and the RESULTS.md writer."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections import OrderedDict

import jax


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:      # the first processor's "name : value" lines
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    present = fields.get("flags", "").split()
    flags = ", ".join(x for x in ("avx2", "avx512f", "avx512bw", "avx512_bf16") if x in present)
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    try:
        import jaxlib
        versions["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    for mod in ("optax", "torch", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "not installed"
    try:
        import torch
        versions["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    dev = jax.devices()[0]
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    git = None
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    return dict(cpu=cpu, cpu_flags=flags, cores=os.cpu_count(), memory_gb=mem_gb,
                platform=dev.platform, device_kind=getattr(dev, "device_kind", str(dev)),
                device_count=jax.device_count(), versions=versions, git=git,
                xla_flags=os.environ.get("XLA_FLAGS") or None,
                glibc_tunables=os.environ.get("GLIBC_TUNABLES") or None,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def load_average() -> tuple | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _mb(x):
    if x is None:
        return "–"
    mb = x / 2**20
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}"


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def detail_tables(rows: list[dict]) -> str:
    """One table per tree: every candidate of every optimizer, errors included."""
    out = []
    by_tree: OrderedDict = OrderedDict()
    for r in rows:
        by_tree.setdefault(r["tree"], []).append(r)
    for tree, rs in by_tree.items():
        r0 = rs[0]
        out.append(f"### {tree} — {r0['tree_params']:,} params, {r0['tree_leaves']} leaves\n")
        out.append("| optimizer | impl | step ms (median) | min–max ms | floor/step | vs Optax | "
                   "GB/s | trace s | lower s | compile s | state MB | peak MB | temp MB | "
                   "copies | fusions | rel. diff vs Optax |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            if r.get("error"):
                out.append(f"| {r['optimizer']} | {r['impl']} | error: {r['error']} |" + " |" * 13)
                continue
            impl = r["impl"]
            if impl in ("floor", "null"):
                impl = f"{impl} {r.get('traffic', '')}"
            gbps = r.get("gbps") if r["impl"] == "floor" else (
                None if r["impl"] == "null" else r.get("effective_gbps"))
            out.append(
                f"| {r['optimizer']} | {impl} | {_ms(r['step_ms'])} | "
                f"{_ms(r['step_min_ms'])}–{_ms(r['step_max_ms'])} | "
                f"{_f(r.get('floor_fraction')) if r['impl'] != 'null' else '–'} | "
                f"{_f(r.get('vs_optax'))} | {_f(gbps, '{:.1f}')} | {_f(r.get('trace_s'))} | "
                f"{_f(r.get('lower_s'))} | {_f(r.get('compile_s'))} | {_mb(r.get('state_bytes'))} | "
                f"{_mb(r.get('peak_bytes'))} | {_mb(r.get('temp_bytes'))} | "
                f"{_f(r.get('hlo_copies'), '{}')} | {_f(r.get('hlo_fusions'), '{}')} | "
                f"{_f(r.get('rel_diff_vs_optax'), '{:.1e}')} |")
        out.append("")
    return "\n".join(out)


def summary_table(rows: list[dict]) -> str:
    """Headline: per tree and optimizer, gradtx vs Optax vs the floor (and torch for AdamW)."""
    groups: OrderedDict = OrderedDict()
    for r in rows:
        groups.setdefault((r["tree"], r["optimizer"]), {})[r["impl"]] = r
    lines = ["| tree | optimizer | floor ms | gradtx ms | Optax ms | gradtx / Optax | "
             "gradtx floor/step | Optax floor/step | torch foreach ms | torch fused ms | "
             "null ms | gradtx compile s | Optax compile s | gradtx state MB | Optax state MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (tree, opt), g in groups.items():
        gx, ox, fl, nl = g.get("gradtx", {}), g.get("optax", {}), g.get("floor", {}), g.get("null", {})
        tf, tu = g.get("torch-foreach", {}), g.get("torch-fused", {})

        def ms(r):
            if r.get("error"):
                return "n/a"
            return _ms(r.get("step_ms"))

        def compile_s(r):
            if r.get("compile_s") is None:
                return "–"
            return f"{r['trace_s'] + r['lower_s']:.2f}+{r['compile_s']:.2f}"
        ratio = (gx["step_ms"] / ox["step_ms"]) if gx.get("step_ms") and ox.get("step_ms") else None
        lines.append(
            f"| {tree} | {opt} | {_ms(fl.get('step_ms'))} | {ms(gx)} | {ms(ox)} | {_f(ratio)} | "
            f"{_f(gx.get('floor_fraction'))} | {_f(ox.get('floor_fraction'))} | {ms(tf)} | {ms(tu)} | "
            f"{_ms(nl.get('step_ms'))} | {compile_s(gx)} | {compile_s(ox)} | "
            f"{_mb(gx.get('state_bytes'))} | {_mb(ox.get('state_bytes'))} |")
    return "\n".join(lines)


def machine_lines(info: dict, command: str, load_before, load_after, elapsed_s: float) -> str:
    v = info["versions"]
    return "\n".join([
        f"- Date: {info['date']}; git {info.get('git') or '?'}",
        f"- Command: `{command}` ({elapsed_s / 60:.1f} min)",
        f"- Device: {info['platform']} ({info['device_kind']}, {info['device_count']} device(s)); "
        f"CPU: {info['cpu']} ({info['cores']} cores visible; {info['cpu_flags'] or 'no AVX flags'}); "
        f"memory {_f(info.get('memory_gb'), '{:.0f}')} GiB",
        f"- Versions: python {v.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
        f"optax {v.get('optax')}, torch {v.get('torch')} ({v.get('torch_threads', '?')} threads), "
        f"numpy {v.get('numpy')}",
        f"- XLA_FLAGS: `{info['xla_flags']}`" if info.get("xla_flags") else "- XLA_FLAGS: none",
        f"- GLIBC_TUNABLES: `{info['glibc_tunables']}`" if info.get("glibc_tunables")
        else "- GLIBC_TUNABLES: none",
        f"- Load average (1, 5, 15 min) before: {load_before}, after: {load_after}",
    ])


def publish(text: str, path: str | None, log) -> None:
    """Print a study's Markdown report, and write it to ``path`` when one is given."""
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
        log(f"wrote {path}")
