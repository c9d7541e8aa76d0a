"""Run the gradtx performance harness: ``python -m benchmarks.run [--quick] [--json FILE] ...``.

Everything runs in one process so that ratios (gradtx / Optax, step / floor) are measured under the
same conditions. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def parse_args(argv=None):
    from benchmarks.suite import DEFAULT_ORDER, SPECS
    from benchmarks.trees import ALL_TREES
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small trees (1M leaf, 2x128 transformer, 100 leaves), few repetitions (< 2 min)")
    p.add_argument("--json", metavar="FILE", help="also write every row (and the machine) as JSON")
    p.add_argument("--only", metavar="NAMES",
                   help=f"comma-separated optimizers (default all: {','.join(DEFAULT_ORDER)})")
    p.add_argument("--trees", metavar="NAMES",
                   help=f"comma-separated trees among {','.join(ALL_TREES)} (default: full or quick set)")
    p.add_argument("--reps", type=int, help="timed rounds per optimizer (default 25; quick 7)")
    p.add_argument("--warmup", type=int, help="untimed calls per candidate first (default 3; quick 2)")
    p.add_argument("--budget", type=float,
                   help="seconds of timed rounds per optimizer group before stopping early "
                        "(never fewer than 5 rounds; default 60, quick 10)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch AdamW peers")
    p.add_argument("--torch-threads", type=int,
                   help="torch.set_num_threads for the torch peers (default: torch's own, = cores); "
                        "1 avoids OpenMP spin-wait collapse when the machine is oversubscribed")
    p.add_argument("--no-optax", action="store_true", help="skip the Optax peers")
    p.add_argument("--write-results", nargs="?", const=RESULTS_PATH, metavar="FILE",
                   help=f"(re)write the published results file (default {RESULTS_PATH})")
    p.add_argument("--xla-flags", metavar="FLAGS",
                   help="XLA flags for every candidate (appended to $XLA_FLAGS before JAX starts), "
                        "e.g. --xla-flags=--xla_cpu_copy_insertion_use_region_analysis=true; "
                        "recorded with the results")
    p.add_argument("--note", action="append", default=[],
                   help="a line added to the notes of the results file (repeatable)")
    args = p.parse_args(argv)
    names = DEFAULT_ORDER if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}; choose from {list(SPECS)}")
    args.optimizer_names = list(names)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.xla_flags:
        # read by XLA when the first backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS"), args.xla_flags) if x)
    import jax

    from benchmarks import harness, report
    from benchmarks.trees import ALL_TREES, FULL_TREES, QUICK_TREES

    if args.trees:
        tree_names = [x.strip() for x in args.trees.split(",") if x.strip()]
        bad = [t for t in tree_names if t not in ALL_TREES]
        if bad:
            print(f"unknown tree(s) {bad}; choose from {list(ALL_TREES)}", file=sys.stderr)
            return 2
    else:
        tree_names = list(QUICK_TREES if args.quick else FULL_TREES)
    if args.torch_threads and not args.no_torch:
        import torch
        torch.set_num_threads(args.torch_threads)
    settings = harness.Settings(
        warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3),
        reps=args.reps if args.reps is not None else (7 if args.quick else 25),
        time_budget_s=args.budget if args.budget is not None else (10.0 if args.quick else 60.0),
        torch=not args.no_torch, optax=not args.no_optax,
        log=lambda *a: print(*a, file=sys.stderr, flush=True))

    try:
        import gradtx
    except Exception as e:  # noqa: BLE001 - measure the peers even while gradtx is broken
        print(f"gradtx failed to import ({type(e).__name__}: {e}); running the peers only",
              file=sys.stderr)
        gradtx = None
    optax = None
    if not args.no_optax:
        try:
            import optax
        except ImportError:
            print("optax is not installed: running without the Optax peer", file=sys.stderr)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    info = report.machine_info()
    load_before = report.load_average()
    print(f"# gradtx benchmarks on {info['platform']} ({info['device_kind']}; {info['cpu']}, "
          f"{info['cores']} cores); jax {jax.__version__}", file=sys.stderr)
    start = time.perf_counter()

    def save(rows, final):
        elapsed = time.perf_counter() - start
        load_after = report.load_average()
        summary = report.summary_table(rows)
        details = report.detail_tables(rows)
        header = report.machine_lines(info, command, load_before, load_after, elapsed)
        notes = list(args.note)
        if not final:
            done = list(dict.fromkeys(r["tree"] for r in rows))
            notes.append(f"PARTIAL results (run in progress; trees done: {', '.join(done)}).")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(machine=info, command=command, load_before=load_before,
                               load_after=load_after, elapsed_s=elapsed, complete=final,
                               rows=rows), f, indent=1, default=str)
        if args.write_results:
            write_results(args.write_results, header, summary, details, notes, load_before,
                          load_after, info)
        return header, summary, details

    rows = harness.run([ALL_TREES[t] for t in tree_names], args.optimizer_names, settings,
                       gradtx_module=gradtx, optax_module=optax,
                       after_tree=lambda rows: save(rows, final=False))
    header, summary, details = save(rows, final=True)
    print(header + "\n\n## Summary\n\n" + summary + "\n\n## Details\n\n" + details)
    return 0


def write_results(path, header, summary, details, notes, load_before, load_after, info) -> None:
    cores = info.get("cores") or 1
    # the load after the run includes the run itself: judge by the load before it
    loaded = load_before is not None and load_before[0] > 0.5 * cores
    note_lines = list(notes)
    if loaded:
        note_lines.append(f"The machine was loaded by other processes when the run started (1-minute load "
                          f"average {load_before[0] if load_before else '?'} before, "
                          f"{load_after[0] if load_after else '?'} after, on {cores} cores): absolute "
                          f"times are inflated and noisy; the ratios, measured in interleaved rounds "
                          f"in one process, are the figures to compare.")
    text = "\n".join([
        "# gradtx benchmark results",
        "",
        "Generated by `python -m benchmarks.run --write-results`; see `benchmarks/README.md` for what",
        "each column means. Compare ratios measured in the same run, not absolute times across runs.",
        "",
        header,
        "",
        *(f"- Note: {n}" for n in note_lines),
        "",
        "## Summary",
        "",
        "Step times are medians of interleaved rounds (one call of each candidate per round) of a",
        "jitted `update + apply_updates` with params and state donated. `floor/step` is the",
        "optimizer's bandwidth floor time divided by its step time (1.0 = at the floor). Compile",
        "columns are `trace+lower` and `compile` seconds.",
        "",
        summary,
        "",
        "## Details",
        "",
        details,
    ])
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
