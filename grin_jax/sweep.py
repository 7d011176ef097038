"""Sweep runner: many training runs from one sweep config, resumable and crash-isolated.

    python -m grin_jax.sweep --config=configs/sweeps/granularity.py --sweep_dir=experiments/granularity/runs

A sweep config is an ml_collections file whose get_config() returns:
    base_config: 'configs/grin_tiny.py[:variant]'      the experiment every trial starts from
    overrides:   {'train': {'steps': 300}}                 fixed overrides for every trial
    product:     {'model': {'granularity': [1, 2, 4]}, 'train': {'seed': [0, 1]}}   cartesian product
    zip:         {'model': {'d_model': [64, 96], 'num_layers': [2, 3]}}            zipped lists (one axis)
(nested like the experiment config, since ConfigDict keys cannot contain dots; trials name fields dotted).
An axis may also be `base_config` itself (trials from different experiment configs, e.g. two routers whose
options differ), and a value None leaves that field as the trial's base config sets it.
    executor:    'local' | 'slurm'     parallel: trials at once for 'local' (default: one per 2 cores)
    slurm:       submitit parameters for 'slurm' (partition, timeout_min, gpus_per_node, ...)
Each trial is a normal `python -m grin_jax.train` run in `<sweep_dir>/trials/<trial_id>/` (its log in log.txt).
Trial ids are short and stable: `t-` and 8 hex digits of a hash of the trial's overrides (trial_id), the same on
every rerun of the sweep and independent of the trial's place in it. What a trial overrides is in
`<sweep_dir>/sweep.json` (every trial's id and overrides), in `<trial>/trial.json` and in the trial's resolved
config (`<trial>/config.json`); results.csv has one column per overridden field.
A trial is finished when its workdir has summary.json (written atomically by the trainer); rerunning the sweep
skips finished trials and restarts unfinished ones, which resume from their own checkpoints. A failing trial
writes error.json (exit code, last lines of its log) and the others go on. At the end every trial's summary is
gathered into `<sweep_dir>/results.csv` (written atomically).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import time

SUMMARY = "summary.json"
ERROR = "error.json"


def _format_value(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _dotted(tree, *, leaves_are_lists: bool, prefix: str = "") -> dict:
    """{'model': {'top_k': [1, 2]}} -> {'model.top_k': [1, 2]} (ConfigDict keys cannot contain dots)."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (leaves_are_lists and not value):
            out.update(_dotted(value, leaves_are_lists=leaves_are_lists, prefix=name + "."))
        else:
            out[name] = value
    return out


def expand_trials(sweep) -> list[dict]:
    """The list of trials: each a dict of dotted config overrides (fixed overrides, then product x zip axes).

    `overrides`, `product` and `zip` are nested like the experiment config: {'model': {'top_k': [1, 2]}}."""
    fixed = _dotted(sweep.get("overrides", {}), leaves_are_lists=False)
    product = _dotted(sweep.get("product", {}), leaves_are_lists=True)
    zipped = _dotted(sweep.get("zip", {}), leaves_are_lists=True)
    for name, values in list(product.items()) + list(zipped.items()):
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep axis {name!r}={values!r} is invalid: accepted values are non-empty lists")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ValueError(f"sweep 'zip' axes must have equal lengths, got "
                         f"{ {k: len(v) for k, v in zipped.items()} }")
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    trials = []
    for values in itertools.product(*product.values()) if product else [()]:
        for zip_row in zip_rows:
            trial = dict(fixed)
            trial.update(dict(zip(product, values)))
            trial.update(zip_row)
            trials.append(trial)
    return trials


def trial_id(overrides: dict) -> str:
    """A short, stable directory name for a trial: 't-' + the first 8 hex digits of the SHA-1 of its overrides
    (as sorted JSON). Equal overrides give equal ids; the overrides themselves are in sweep.json."""
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"t-{digest}"


def _check_unique(trials: list[dict]) -> None:
    seen: dict[str, dict] = {}
    for trial in trials:
        tid = trial_id(trial)
        if tid in seen:
            raise ValueError(f"sweep trials {seen[tid]} and {trial} have the same id {tid!r}: "
                             + ("they are the same trial; remove the repeated axis value" if seen[tid] == trial
                                else "a hash collision; change an override"))
        seen[tid] = trial


def trial_command(base_config: str, workdir: str, overrides: dict) -> list[str]:
    """The trainer's command line of a trial: its own base_config when it has one, then every override that is
    not None."""
    return [sys.executable, "-m", "grin_jax.train", f"--config={overrides.get('base_config') or base_config}",
            f"--workdir={workdir}", *[f"--config.{k}={_format_value(v)}" for k, v in overrides.items()
                                      if k != "base_config" and v is not None]]


def run_trial(command: list[str], workdir: str) -> dict:
    """Run one trial to completion in a subprocess; returns its status record (never raises)."""
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    status = {"returncode": proc.returncode, "seconds": time.time() - started}
    if proc.returncode != 0 or not os.path.exists(os.path.join(workdir, SUMMARY)):
        with open(os.path.join(workdir, "log.txt")) as f:
            tail = f.readlines()[-30:]
        status["error"] = "".join(tail)
        _write_json_atomic(os.path.join(workdir, ERROR), status)
    elif os.path.exists(os.path.join(workdir, ERROR)):
        os.remove(os.path.join(workdir, ERROR))
    return status


def _write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}{k}.", v, out)
    else:
        out[prefix[:-1]] = value


def gather_results(sweep_dir: str, trials: list[dict]) -> list[dict]:
    """One row per trial: its overrides, status and the trainer's summary.json fields (flattened)."""
    rows = []
    for overrides in trials:
        tid = trial_id(overrides)
        workdir = os.path.join(sweep_dir, "trials", tid)
        row = {"trial": tid, **{k: _format_value(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}}
        summary_path = os.path.join(workdir, SUMMARY)
        error_path = os.path.join(workdir, ERROR)
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            flat: dict = {}
            _flatten("", summary, flat)
            row.update({k: v for k, v in flat.items() if not isinstance(v, (list, dict))})
            row["status"] = "done"
        elif os.path.exists(error_path):
            with open(error_path) as f:
                error = json.load(f)
            row["status"] = "failed"
            lines = (error.get("error") or "").strip().splitlines()
            said = [line for line in lines if line.startswith("error: ")]  # a user error's line (grin_jax.cli)
            row["error"] = (said or lines)[-1] if lines else f"exit code {error.get('returncode')}"
        else:
            row["status"] = "pending"
        rows.append(row)
    return rows


def write_results_csv(path: str, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def _slurm_executor(sweep, sweep_dir: str):
    import submitit  # optional dependency: pip install -e .[slurm]
    cluster = sweep.get("slurm", {}).get("cluster", None)
    executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, "submitit"), cluster=cluster)
    params = {k: v for k, v in dict(sweep.get("slurm", {})).items() if k != "cluster"}
    if params:
        executor.update_parameters(**params)
    return executor


def _base_config(sweep, trials: list[dict]) -> str:
    """The sweep's base_config, checked with every trial's own (a base_config axis) to exist."""
    base_config = sweep.get("base_config", None)
    if not base_config:
        raise ValueError("sweep config key 'base_config' is missing: give the experiment config path, "
                         "e.g. 'configs/grin_tiny.py'")
    for path in {base_config, *(t["base_config"] for t in trials if t.get("base_config"))}:
        if not os.path.exists(path.split(":")[0]):
            raise ValueError(f"sweep config key 'base_config'={path!r}: no such file")
    return base_config


def _prepare_jobs(base_config: str, sweep_dir: str, todo: list[dict]) -> list[tuple[list[str], str]]:
    """(command, workdir) of every trial to run; each workdir gets trial.json (id, base config, overrides)."""
    jobs = []
    for t in todo:
        workdir = os.path.join(sweep_dir, "trials", trial_id(t))
        os.makedirs(workdir, exist_ok=True)
        _write_json_atomic(os.path.join(workdir, "trial.json"),
                           {"id": trial_id(t), "base_config": t.get("base_config") or base_config, "overrides": t})
        jobs.append((trial_command(base_config, workdir, t), workdir))
    return jobs


def _run_jobs(jobs, sweep, sweep_dir: str, executor: str, parallel: int, bar) -> int:
    """Run the jobs locally or through submitit; returns how many failed."""
    failures = 0
    if executor == "local":
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(run_trial, cmd, wd): wd for cmd, wd in jobs}
            for future in concurrent.futures.as_completed(futures):
                failures += "error" in future.result()
                if bar:
                    bar.update(1)
        return failures
    slurm = _slurm_executor(sweep, sweep_dir)
    submitted = [slurm.submit(run_trial, cmd, wd) for cmd, wd in jobs]
    for job in submitted:
        try:
            failures += "error" in job.result()
        except Exception as exc:  # the scheduler lost the job: recorded, the others go on
            failures += 1
            print(f"sweep: job {job.job_id} failed: {exc}", file=sys.stderr)
        if bar:
            bar.update(1)
    return failures


def run_sweep(sweep, sweep_dir: str, *, parallel: int | None = None, executor: str | None = None,
              progress: bool = True) -> list[dict]:
    """Run every unfinished trial of `sweep` and write `<sweep_dir>/results.csv`. Returns the result rows."""
    executor = executor or sweep.get("executor", "local")
    if executor not in ("local", "slurm"):
        raise ValueError(f"executor={executor!r} is unknown: accepted values are ['local', 'slurm']")
    parallel = parallel or sweep.get("parallel", 0) or max(1, (os.cpu_count() or 2) // 2)
    trials = expand_trials(sweep)
    base_config = _base_config(sweep, trials)
    _check_unique(trials)
    os.makedirs(os.path.join(sweep_dir, "trials"), exist_ok=True)
    _write_json_atomic(os.path.join(sweep_dir, "sweep.json"),
                       {"base_config": base_config, "trials": [{"id": trial_id(t), "overrides": t} for t in trials]})
    todo = [t for t in trials if not os.path.exists(os.path.join(sweep_dir, "trials", trial_id(t), SUMMARY))]
    print(f"sweep: {len(trials)} trials, {len(trials) - len(todo)} already finished, {len(todo)} to run "
          f"({executor}, {parallel if executor == 'local' else 'scheduler'} at once)", flush=True)
    jobs = _prepare_jobs(base_config, sweep_dir, todo)
    bar = None
    if progress and jobs:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="trials", unit="trial")
    failures = _run_jobs(jobs, sweep, sweep_dir, executor, parallel, bar)
    if bar:
        bar.close()
    rows = gather_results(sweep_dir, trials)
    write_results_csv(os.path.join(sweep_dir, "results.csv"), rows)
    done = sum(r["status"] == "done" for r in rows)
    print(f"sweep: {done}/{len(rows)} trials finished, {failures} failed in this run; "
          f"results in {os.path.join(sweep_dir, 'results.csv')}", flush=True)
    return rows


def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)  # a user error: one line (GRIN_JAX_DEBUG=1 for the traceback)


def _main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "sweep config file", flag_values=flag_values,
                                    lock_config=False)
    flags.DEFINE_string("sweep_dir", None, "directory of the sweep's trials and results", flag_values=flag_values)
    flags.DEFINE_integer("parallel", None, "local executor: trials at once", flag_values=flag_values)
    flags.DEFINE_enum("executor", None, ["local", "slurm"], "override the sweep's executor", flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "print the trials and exit", flag_values=flag_values)
    flag_values(argv if argv is not None else sys.argv)
    if flag_values.config is None or not flag_values.sweep_dir:
        raise SystemExit("usage: python -m grin_jax.sweep --config=SWEEP.py --sweep_dir=DIR [--parallel N]")
    sweep = flag_values.config
    if flag_values.dry_run:
        for trial in expand_trials(sweep):
            print(trial_id(trial), json.dumps(trial, default=str))
        return 0
    rows = run_sweep(sweep, flag_values.sweep_dir, parallel=flag_values.parallel, executor=flag_values.executor)
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
