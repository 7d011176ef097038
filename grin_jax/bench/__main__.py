"""python -m grin_jax.bench [--quick] [--json out.json] [--reps N] [--only REGEX]

Runs the MoE benchmark suite in one process (see grin_jax/bench/__init__.py), prints a table, optionally writes
one JSON record per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
import traceback

import jax

from grin_jax.bench import cases, harness


def _fmt_bytes(n) -> str:
    return "-" if not n else f"{n / 2 ** 20:.0f}"


def format_table(records: list[dict]) -> str:
    """One row per record; %peak against the peak_matmul of the same group."""
    peak = {r["group"]: r["gflops_per_s"] for r in records if r["name"] == "peak_matmul"}
    head = (f"{'variant':40s} {'reps':>4s} {'median ms':>10s} {'x dense':>8s} {'cpu x':>6s} {'util':>5s} "
            f"{'GFLOP/s':>8s} {'%peak':>6s} {'GB/s':>6s} {'temp MiB':>9s} {'peak MiB':>9s}")
    lines, group = [], None
    for i, r in enumerate(records):
        if r["group"] != group:
            group = r["group"]
            note = next((n for g, n in _NOTES.items() if g == group and n), "")
            lines += ["", f"## {group}" + (f"   [{note}]" if note else ""), head, "-" * len(head)]
        ratio = "-" if r["ratio_to_dense"] is None else f"{r['ratio_to_dense']:.2f}"
        cpu_ratio = "-" if r["cpu_ratio_to_dense"] is None else f"{r['cpu_ratio_to_dense']:.2f}"
        useful = r["useful_gflop"] > 0
        gflops = f"{r['gflops_per_s']:.0f}" if useful else "-"
        pct = f"{100 * r['gflops_per_s'] / peak[group]:.0f}" if useful and peak.get(group) else "-"
        bandwidth = f"{r['gbytes_per_s']:.1f}" if r.get("gbytes_per_s") else "-"
        mem = r.get("memory") or {}
        util = f"{r['median_cpu_s'] / r['median_s']:.2f}" if r.get("median_cpu_s") else "-"
        lines.append(f"{r['name']:40s} {r['reps']:4d} {1e3 * r['median_s']:10.1f} {ratio:>8s} {cpu_ratio:>6s} "
                     f"{util:>5s} {gflops:>8s} {pct:>6s} {bandwidth:>6s} {_fmt_bytes(mem.get('temp_bytes')):>9s} "
                     f"{_fmt_bytes(mem.get('peak_bytes')):>9s}")
        if i + 1 == len(records) or records[i + 1]["group"] != group:
            lines += _speedup_lines([s for s in records if s["group"] == group])
            lines += _throughput_lines([s for s in records if s["group"] == group])
    return "\n".join(lines)


def _speedup_lines(records: list[dict]) -> list[str]:
    """'speed-up' lines (1 / x dense, wall and CPU time) of a group's records marked 'report_speedup'."""
    marked = [r for r in records if r.get("report_speedup") and r["ratio_to_dense"]]
    return [f"speed-up {r['baseline']} / {r['name']}: {1 / r['ratio_to_dense']:.2f}x"
            + (f" (cpu {1 / r['cpu_ratio_to_dense']:.2f}x)" if r["cpu_ratio_to_dense"] else "") for r in marked]


def _throughput_lines(records: list[dict]) -> list[str]:
    """'tokens/s' lines of a group's train steps (records of mode 'train_step' whose shape states its tokens)."""
    steps = [r for r in records if r.get("mode") == "train_step" and (r.get("shape") or {}).get("tokens")]
    return [f"tokens/s {r['name']}: {r['shape']['tokens'] / r['median_s']:,.0f}" for r in steps]


_NOTES: dict[str, str] = {}


def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)  # a user error (a bad --json path, a full disk): one line


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grin_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps: a smoke run for CI (seconds)")
    parser.add_argument("--json", metavar="PATH", help="write one record per case to PATH")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per variant (default 7, quick 2)")
    parser.add_argument("--slow-reps", type=int, default=None,
                        help="repetitions of the dense-reference and ragged_dot variants (default 3, quick 1)")
    parser.add_argument("--only", metavar="REGEX", default=None, help="run only the groups whose name matches")
    parser.add_argument("--train-step", action="store_true", help="with --quick: also the train-step case")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 7)  # --reps 0: refused, not the default
    slow_reps = args.slow_reps if args.slow_reps is not None else (1 if args.quick else 3)
    if reps < 1 or slow_reps < 1:
        parser.error("--reps and --slow-reps must be >= 1")
    sizes = cases.QUICK if args.quick else cases.FULL
    if args.train_step:
        sizes = dataclasses.replace(sizes, train_step=True)
    from grin_jax.train import trainer
    kept = trainer.keep_freed_buffers()  # as the trainer runs (the PyTorch peers, in this process, alike)
    key = jax.random.key(0)
    load_start = os.getloadavg()

    groups = (cases.granularity_groups(sizes, key) + cases.backend_groups(sizes, key, slow_reps=slow_reps)
              + cases.router_groups(sizes, key) + cases.peer_groups(sizes, key)
              + cases.peer_train_step_groups(sizes, key) + cases.ds_moe_layer_groups(sizes, key)
              + cases.ds_moe_model_groups(sizes, key))
    train_groups, skipped = cases.train_step_group(sizes, key)
    groups += train_groups
    if args.only:
        groups = [g for g in groups if re.search(args.only, g.name)]
    print(f"grin_jax.bench: jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} cpus, python {platform.python_version()}, reps {reps} (slow {slow_reps}), "
          f"load average {load_start[0]:.1f}, freed buffers kept {'on' if kept else 'off'} "
          f"(trainer.keep_freed_buffers)", file=sys.stderr, flush=True)
    records, errors = [], []
    start = time.perf_counter()
    for group in groups:
        _NOTES[group.name] = group.note
        print(f"[{time.perf_counter() - start:6.0f}s] {group.name}", file=sys.stderr, flush=True)
        try:
            records += harness.run_group(group, reps=reps, log=lambda s: print(s, file=sys.stderr, flush=True))
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others; reported below
            traceback.print_exc()
            errors.append(f"group {group.name!r} FAILED: {type(error).__name__}: {error}")
    load_end = os.getloadavg()
    print(format_table(records))
    footer = [
        "",
        "x dense: median wall time / median of the dense FFN with the same active FLOPs (same group, same mode);",
        "cpu x: the same with process CPU time (user+sys; steadier than wall time on a shared machine);",
        "util: CPU seconds per wall second (~2 = both cores ours, ~1 = another process held a core during the group).",
        "GFLOP/s: useful (active) FLOPs / median wall time; %peak: of the group's f32 peak_matmul.",
        "GB/s: the least bytes a call must move / median wall time (stream_triad: the machine's memory bandwidth).",
        f"load average (1 min) at start {load_start[0]:.1f}, at end {load_end[0]:.1f}; {os.cpu_count()} cpus; "
        f"total {time.perf_counter() - start:.0f}s.",
    ]
    if skipped:
        footer.append(skipped)
    footer += errors
    print("\n".join(footer))
    if args.json:
        payload = {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
                   "quick": args.quick, "reps": reps, "slow_reps": slow_reps,
                   "load_average": {"start": load_start[0], "end": load_end[0]},
                   "skipped": [skipped] if skipped else [], "errors": errors, "records": records}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
