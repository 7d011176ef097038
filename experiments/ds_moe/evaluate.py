"""The sparsity grid (python -m grin_jax.sparsity) of every finished trial of the DS-MoE sweep
(configs/sweeps/ds_moe.py): each trial's checkpoint evaluated dense and at top-K, threshold and threshold-top-K for
the MLP and the attention experts separately, on the whole validation split; the baselines (dense, top-2 MoE) get
their one row on the same batches. Writes TRIAL/sparsity/{grid.json, grid.csv, grid.md, loss_vs_active.png}.

    python experiments/ds_moe/evaluate.py [experiments/ds_moe/runs] [--parallel 2] [--max_batches 0]

A trial whose grid.json exists is skipped (rerun after a crash and only the missing ones run); a failed trial is
reported and the others go on.
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def pending(sweep_dir: str) -> list[str]:
    trials = os.path.join(sweep_dir, "trials")
    out = []
    for name in sorted(os.listdir(trials)):
        workdir = os.path.join(trials, name)
        if os.path.exists(os.path.join(workdir, "summary.json")) and \
                not os.path.exists(os.path.join(workdir, "sparsity", "grid.json")):
            out.append(workdir)
    return out


def run(workdir: str, max_batches: int) -> tuple[str, int]:
    with open(os.path.join(workdir, "sparsity_log.txt"), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "grin_jax.sparsity", f"--workdir={workdir}",
                               f"--max_batches={max_batches}"], stdout=log, stderr=subprocess.STDOUT)
    return workdir, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir", nargs="?", default=os.path.join(HERE, "runs"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--max_batches", type=int, default=0, help="0: the whole validation split")
    args = parser.parse_args()
    todo = pending(args.sweep_dir)
    print(f"{len(todo)} trials to evaluate", flush=True)
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for done, (workdir, code) in enumerate(pool.map(lambda w: run(w, args.max_batches), todo), 1):
            failed += code != 0
            print(f"[{done}/{len(todo)}] {os.path.basename(workdir)}: "
                  f"{'ok' if code == 0 else f'FAILED (exit {code}, see sparsity_log.txt)'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
