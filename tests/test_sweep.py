"""The sweep runner: trials expand as configured and get short stable ids, a failing trial is recorded without
stopping the others, rerunning runs only what is missing, and results.csv is complete and parseable."""

import csv
import glob
import importlib.util
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
    assert failed["error"].startswith("error: ") and "top_k" in failed["error"]  # the trial's one-line error
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


def test_a_base_config_axis_and_unset_values(tmp_path):
    """Trials may come from different experiment configs (a `base_config` axis); None leaves a field as the
    trial's config sets it (top-2 softmax has no jitter_eps). The GRIN vs GShard sweep is built this way."""
    sys.path.insert(0, os.path.join(REPO, "configs", "sweeps"))
    import grin_vs_gshard
    trials = sweep_lib.expand_trials(grin_vs_gshard.get_config())
    assert len(trials) == 3 * 5 and len({sweep_lib.trial_id(t) for t in trials}) == 15
    commands = [sweep_lib.trial_command("configs/grin_tiny.py", "w", t) for t in trials]
    gshard = [c for c in commands if "--config=configs/gshard_tiny.py" in c]
    assert len(gshard) == 3 and not any("jitter_eps" in arg for c in gshard for arg in c)
    assert sorted({arg for c in commands for arg in c if "jitter_eps" in arg}) == [
        f"--config.model.moe.router_options.jitter_eps={eps!r}" for eps in (0.01, 0.05, 0.2, 0.5)]

    smoke = os.path.join(REPO, "configs", "{}_tiny.py:smoke")
    s = make_sweep(zip={"base_config": [smoke.format("grin"), smoke.format("gshard")],
                        "model": {"moe": {"router_options": {"jitter_eps": [0.3, None]}}}})
    sweep_dir = str(tmp_path / "sweep")
    rows = sweep_lib.run_sweep(s, sweep_dir, progress=False)
    assert [r["status"] for r in rows] == ["done", "done"]
    routers = []
    for row in rows:
        with open(os.path.join(sweep_dir, "trials", row["trial"], "config.json")) as f:
            routers.append((json.load(f)["model"]["moe"]["router"], row["model.moe.router_options.jitter_eps"]))
        with open(os.path.join(sweep_dir, "trials", row["trial"], "trial.json")) as f:
            assert json.load(f)["base_config"] == row["base_config"]
    assert routers == [("sparsemixer_v2", 0.3), ("topk_softmax", None)]
    with pytest.raises(ValueError, match=r"'base_config'='nope.py': no such file"):
        sweep_lib.run_sweep(make_sweep(zip={"base_config": ["nope.py"]}), str(tmp_path / "bad"), progress=False)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.py"))))
def test_every_committed_sweep_expands_into_valid_trials(path):
    """Each trial of each sweep config under configs/sweeps/ (full and :quick) is a config the trainer accepts: its
    overrides applied to its base config build the model config (names, values and layouts checked)."""
    from grin_jax import models
    from grin_jax.train.config import validate_train_config
    for arg in (None, "quick"):
        sweep = _load(path).get_config(arg)
        trials = sweep_lib.expand_trials(sweep)
        assert trials
        for trial in trials:
            base, _, variant = (trial.get("base_config") or sweep.base_config).partition(":")
            config = _load(os.path.join(REPO, base)).get_config(variant or None)
            for key, value in trial.items():
                if key == "base_config" or value is None:
                    continue
                *parents, leaf = key.split(".")
                section = config
                for name in parents:
                    section = section[name]
                if isinstance(section, ml_collections.ConfigDict):
                    with section.unlocked():
                        section[leaf] = value
                else:
                    section[leaf] = value
            models.model_config_from(config.model)
            validate_train_config(config.train)


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
