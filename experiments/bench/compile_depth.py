"""Compile time and activation memory of the train step against depth: the layers unrolled or scanned, and the
rematerialisation policies, side by side in one process.

    python experiments/bench/compile_depth.py [--layers 4,32] [--batch 8] [--seq 256] [--out PREFIX]

For each depth it lowers and compiles the AdamW train step of grin_tiny (d_model 128, 8 experts, top-2, SparseMixer)
from abstract shapes, with model.scan_layers off and on, and for the scanned model each model.remat policy, and
prints the seconds to trace + lower, the seconds to compile, and XLA's temp buffer size (activations and
temporaries kept for the backward pass, as XLA:CPU assigns them). Ratios 32 vs 4 layers are printed per variant.
The 'grad only' rows compile the loss's value_and_grad without the optimizer: the optimizer update (and the
stacking of the per-layer parameters for the scan) is per parameter array, so it still grows with depth.
PREFIX.txt / PREFIX.json get the table and the records (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "configs"))

from grin_jax.train import step as _step  # noqa: E402
from grin_jax.train import trainer  # noqa: E402

VARIANTS = (("unrolled", dict(scan_layers=False, remat="none")),
            ("scanned", dict(scan_layers=True, remat="none")),
            ("unrolled, grad only", dict(scan_layers=False, remat="none", grad_only=True)),
            ("scanned, grad only", dict(scan_layers=True, remat="none", grad_only=True)),
            ("scanned, remat full", dict(scan_layers=True, remat="full")),
            ("scanned, remat save_matmuls", dict(scan_layers=True, remat="save_matmuls")),
            ("scanned, remat save_names attention_out", dict(scan_layers=True, remat="save_names",
                                                            remat_names=("attention_out",))))


def measure(num_layers: int, changes: dict, batch: int, seq: int) -> dict:
    import grin_tiny

    config = grin_tiny.get_config()
    changes = dict(changes)
    grad_only = changes.pop("grad_only", False)
    for key, value in {"num_layers": num_layers, **changes}.items():
        config.model[key] = value
    config.data.seq_len = seq
    config.train.batch_size = batch
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    graphdef, state = trainer.abstract_state(experiment, tx)
    spec = _step.batch_spec(batch, seq, document_attention=False)
    start = time.perf_counter()
    if grad_only:
        loss_fn = _step.make_loss_fn(graphdef)
        grad_fn = jax.value_and_grad(lambda p, b, key: loss_fn(p, b, key)[0])
        lowered = jax.jit(grad_fn).lower(state["params"], spec, state["rng"])
    else:
        lowered = jax.jit(_step.make_train_step(graphdef, tx)).lower(state, spec)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    return {"layers": num_layers, "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0) or 0),
            "argument_bytes": int(getattr(memory, "argument_size_in_bytes", 0) or 0),
            "params": sum(x.size for x in jax.tree.leaves(state["params"]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    records = []
    for name, changes in VARIANTS:
        for layers in depths:
            print(f"[{name}] {layers} layers ...", file=sys.stderr, flush=True)
            records.append({"variant": name, **measure(layers, changes, args.batch, args.seq)})
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [f"grin_tiny train step (AdamW), batch {args.batch} x seq {args.seq}; jax {jax.__version__}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, commit {commit}",
             "", f"{'variant':42s} {'layers':>6s} {'lower s':>8s} {'compile s':>10s} {'temp MiB':>9s}"]
    for r in records:
        lines.append(f"{r['variant']:42s} {r['layers']:6d} {r['lower_s']:8.2f} {r['compile_s']:10.2f} "
                     f"{r['temp_bytes'] / 2**20:9.1f}")
    lines.append("")
    lo, hi = min(depths), max(depths)
    for name, _ in VARIANTS:
        a = next(r for r in records if r["variant"] == name and r["layers"] == lo)
        b = next(r for r in records if r["variant"] == name and r["layers"] == hi)
        total = lambda r: r["lower_s"] + r["compile_s"]  # noqa: E731
        lines.append(f"{name}: lower + compile {hi} vs {lo} layers {total(b) / total(a):.2f}x; "
                     f"temp memory {b['temp_bytes'] / max(a['temp_bytes'], 1):.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        for suffix, content in ((".txt", text + "\n"), (".json", json.dumps(records, indent=1) + "\n")):
            tmp = f"{args.out}{suffix}.tmp"
            with open(tmp, "w") as f:
                f.write(content)
            os.replace(tmp, args.out + suffix)
    return 0


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    sys.exit(main())
