"""python -m grin_jax.train --config=configs/grin_tiny.py[:variant] --workdir=DIR [--config.a.b=value ...]

Multi-process (one process per host or per GPU): the same command in every process; `config.distributed`
(or the cluster's environment: SLURM, Open MPI, Cloud TPU) says how they find each other (grin_jax.sharding).

User errors (a config mistake naming its key, a refused resume, a full disk, a loss that became NaN) print one line
and exit with status 2 (1 for the disk and the loss); set GRIN_JAX_DEBUG=1 for the traceback (grin_jax.cli)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from grin_jax.cli import run_main

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grin_tiny.py", "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, plots); reused to resume; "
                               "required (a default would let two configs share one run directory)")


def main(argv) -> int:
    return run_main(_main, argv)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    if not _WORKDIR.value:
        print("error: --workdir is required (e.g. --workdir=workdirs/grin_tiny); reuse a workdir only to resume "
              "its run", file=sys.stderr)
        sys.exit(2)
    from grin_jax.sharding import initialize_distributed
    from grin_jax.train.trainer import check_resumable, keep_freed_buffers, resolve, resolved_config, train
    keep_freed_buffers()  # before anything starts the backend (its threads' malloc arenas)
    workdir = _WORKDIR.value
    # A config mistake or a refused resume raises ValueError naming the key, here or inside train(): run_main
    # prints it in one line, as it does a full disk or a NonFiniteLossError.
    initialize_distributed(_CONFIG.value)  # multi-process runs: before anything touches the devices
    resolve(_CONFIG.value)
    check_resumable(workdir, resolved_config(_CONFIG.value))
    summary = train(_CONFIG.value, workdir)
    print(f"\n{summary['config_name']}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['wall_seconds']:.0f} s")
    print(f"  final train loss      {summary['final_train_loss']:.4f} nats/token")
    stderr = summary["validation_loss_stderr"]
    print(f"  validation loss       {summary['validation_loss']:.4f}"
          f"{'' if stderr is None else f' ± {stderr:.4f}'} nats/token (± 1 s.e. over "
          f"{summary['validation_documents']} documents; {summary['validation_bits_per_byte']:.4f} bits/byte)")
    print(f"  code                  {summary['git_commit'] or 'not a git checkout'}"
          f"{' (uncommitted changes)' if summary['git_dirty'] else ''}")
    print(f"  workdir               {workdir}  (summary.json, metrics.jsonl, tb/, checkpoints/, "
          f"{', '.join(summary['plots'])})")


if __name__ == "__main__":
    app.run(main)
