"""The sweep runner: trials expand as configured and get short stable ids, a failing trial is recorded without
stopping the others, rerunning runs only what is missing, and results.csv is complete and parseable."""

import csv
import json
import os
import re
import sys

import ml_collections
import pytest

from grin_jax import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sweep(**kw):
    s = ml_collections.ConfigDict()
    s.base_config = os.path.join(REPO, "configs", "grin_tiny.py:smoke")
    s.overrides = {"train": {"steps": 2, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 0,
                             "eval_batches": 1, "final_eval_batches": 1}}
    s.product = {}
    s.zip = {}
    s.executor = "local"
    s.parallel = 2
    for k, v in kw.items():
        s[k] = v
    return s


def test_expand_product_and_zip():
    s = make_sweep(product={"train": {"seed": [0, 1]}, "model": {"router": ["a", "b"]}},
                   zip={"model": {"d_model": [32, 64], "num_layers": [1, 2]}})
    trials = sweep_lib.expand_trials(s)
    assert len(trials) == 2 * 2 * 2
    assert {(t["model.d_model"], t["model.num_layers"]) for t in trials} == {(32, 1), (64, 2)}
    assert all(t["train.steps"] == 2 for t in trials)
    assert len({sweep_lib.trial_id(t) for t in trials}) == len(trials)


def test_trial_ids_are_short_and_stable():
    trial = {"model.moe.granularity": 4, "model.layout": "moe", "train.seed": 2, "model.d_model": 96,
             "train.steps": 300, "train.warmup_steps": 30, "data.seq_len": 128}
    tid = sweep_lib.trial_id(trial)
    assert re.fullmatch(r"t-[0-9a-f]{8}", tid)
    assert sweep_lib.trial_id(dict(reversed(list(trial.items())))) == tid  # order of the keys does not matter
    assert sweep_lib.trial_id({**trial, "train.seed": 3}) != tid
    with pytest.raises(ValueError, match="same id"):
        sweep_lib.run_sweep(make_sweep(product={"train": {"seed": [0, 0]}}), "/tmp/unused", progress=False)


def test_bad_sweeps_rejected():
    with pytest.raises(ValueError, match="zip"):
        sweep_lib.expand_trials(make_sweep(zip={"model": {"a": [1, 2], "b": [1]}}))
    with pytest.raises(ValueError, match="model.top_k"):
        sweep_lib.expand_trials(make_sweep(product={"model": {"top_k": []}}))
    with pytest.raises(ValueError, match="executor"):
        sweep_lib.run_sweep(make_sweep(), "/tmp/unused", executor="cloud")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_failures_isolated_and_resume_runs_only_missing(tmp_path):
    # Three trials; top_k=99 is an invalid config value, so that trial fails fast with a clear error.
    s = make_sweep(product={"model": {"moe": {"top_k": [1, 2, 99]}}})
    sweep_dir = str(tmp_path / "sweep")
    rows = sweep_lib.run_sweep(s, sweep_dir, progress=False)
    status = {r["model.moe.top_k"]: r["status"] for r in rows}
    assert status == {1: "done", 2: "done", 99: "failed"}
    # Short trial directories; the overrides in sweep.json, in each trial's trial.json and its resolved config.
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        listed = json.load(f)["trials"]
    assert sorted(os.listdir(os.path.join(sweep_dir, "trials"))) == sorted(t["id"] for t in listed)
    for entry in listed:
        workdir = os.path.join(sweep_dir, "trials", entry["id"])
        assert re.fullmatch(r"t-[0-9a-f]{8}", entry["id"]) and entry["overrides"]["train.steps"] == 2
        with open(os.path.join(workdir, "trial.json")) as f:
            assert json.load(f)["overrides"] == entry["overrides"]
        if entry["overrides"]["model.moe.top_k"] != 99:
            with open(os.path.join(workdir, "config.json")) as f:
                assert json.load(f)["model"]["moe"]["top_k"] == entry["overrides"]["model.moe.top_k"]
    table = read_csv(os.path.join(sweep_dir, "results.csv"))
    assert len(table) == 3
    failed = next(r for r in table if r["model.moe.top_k"] == "99")
    assert "top_k" in failed["error"]
    done = [r for r in table if r["status"] == "done"]
    for row in done:
        for column in ("N", "D", "G", "loss", "flops", "validation_loss", "wall_seconds"):
            float(row[column])  # present and numeric
        assert int(row["D"]) == 2 * 4 * 32

    # Interrupt one finished trial (no summary.json: as if killed) and rerun the sweep: only it and the failed
    # trial run again.
    trials = sweep_lib.expand_trials(s)
    by_k = {t["model.moe.top_k"]: os.path.join(sweep_dir, "trials", sweep_lib.trial_id(t)) for t in trials}
    os.remove(os.path.join(by_k[2], "summary.json"))
    untouched = os.path.getmtime(os.path.join(by_k[1], "summary.json"))
    rows = sweep_lib.run_sweep(s, sweep_dir, progress=False)
    assert {r["model.moe.top_k"]: r["status"] for r in rows} == {1: "done", 2: "done", 99: "failed"}
    assert os.path.getmtime(os.path.join(by_k[1], "summary.json")) == untouched
    with open(os.path.join(by_k[2], "log.txt")) as f:
        assert f.read().count("\n$ ") == 2  # ran twice
    with open(os.path.join(by_k[1], "log.txt")) as f:
        assert f.read().count("\n$ ") == 1  # ran once


def test_slurm_executor_through_submitit_local_cluster(tmp_path):
    """executor='slurm' goes through submitit; its 'local' cluster runs the same jobs as subprocesses."""
    s = make_sweep(product={"model": {"moe": {"top_k": [2, 99]}}}, executor="slurm",
                   slurm={"cluster": "local", "timeout_min": 10})
    sweep_dir = str(tmp_path / "slurm")
    rows = sweep_lib.run_sweep(s, sweep_dir, progress=False)
    assert {r["model.moe.top_k"]: r["status"] for r in rows} == {2: "done", 99: "failed"}
    assert os.listdir(os.path.join(sweep_dir, "submitit"))
    table = read_csv(os.path.join(sweep_dir, "results.csv"))
    assert float(next(r for r in table if r["model.moe.top_k"] == "2")["loss"]) > 0
