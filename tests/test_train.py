"""The trainer: runs, resumes exactly, writes its outputs, rejects bad configs before compiling."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from grin_jax.train import trainer
from grin_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
sys.path.insert(0, CONFIGS)

import grin_tiny  # noqa: E402


def smoke_config(**train_overrides):
    config = grin_tiny.get_config("smoke")
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r.get("train/loss") is not None}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    summary = trainer.train(smoke_config(checkpoint_every=2), workdir)
    return workdir, summary


def test_run_writes_everything(full_run):
    workdir, summary = full_run
    for name in ("summary.json", "metrics.jsonl", "config.json", "loss.png", "expert_load.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tb"))
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["steps"] == 6 and on_disk["tokens_seen"] == 6 * 4 * 32
    assert math.isfinite(on_disk["validation_loss"]) and on_disk["validation_bits_per_byte"] > 0
    assert on_disk["params"]["total"] > on_disk["params"]["active"] > 0
    losses = train_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    # Starts near uniform over the 259 byte ids (ln 259 = 5.56, plus the initial logit variance); six AdamW steps
    # at a high learning rate already bring it down clearly.
    assert losses[1] < math.log(259) + 1.0
    assert losses[6] < losses[1] - 0.5
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    load = next(r["train/moe/expert_load"] for r in records if "train/moe/expert_load" in r)
    assert np.allclose(np.sum(load, axis=-1), 1.0, atol=1e-5)  # per layer, fractions of token-slots


def test_killed_run_resumes_step_for_step(full_run, tmp_path, monkeypatch):
    full_workdir, _ = full_run
    workdir = str(tmp_path / "resumed")
    calls = {"n": 0}
    original = trainer._device_batch

    def crash_after_five(batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated kill")
        return original(batch)

    monkeypatch.setattr(trainer, "_device_batch", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(smoke_config(checkpoint_every=2), workdir)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    monkeypatch.setattr(trainer, "_device_batch", original)
    summary = trainer.train(smoke_config(checkpoint_every=2), workdir)  # resumes from step 4
    expected, resumed = train_losses(full_workdir), train_losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 of the crashed run were dropped and redone
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), step
    assert summary["steps"] == 6


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A 1e30 learning rate without clipping blows the parameters up within a few steps; checkpoints are written
    # every step until then. The run must stop at the first non-finite loss and keep the previous step's checkpoint.
    config = smoke_config(checkpoint_every=1, learning_rate=1e30, clip_norm=0.0, warmup_steps=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(trainer.NonFiniteLossError, match="last good checkpoint") as error:
        trainer.train(config, workdir)
    failed_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert f"(step {failed_step - 1})" in str(error.value)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] == failed_step - 1
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.parametrize("key,value,match", [
    ("train.steps", 0, "train.steps"),
    ("train.learning_rate", -1.0, "train.learning_rate"),
    ("train.warmup_steps", 100, "train.warmup_steps"),
    ("model.num_kv_heads", 3, "num_kv_heads"),
    ("model.router", "nope", "router"),
    ("data.tokenizer", "nope", "tokenizer"),
    ("data.seq_len", 100000, "seq_len"),
])
def test_invalid_values_rejected_before_compiling(key, value, match):
    config = smoke_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
        trainer.resolve(config)


@pytest.mark.parametrize("override,needle", [
    ("--config.train.nonexistent=1", "nonexistent"),
    ("--config.train.steps=abc", "steps"),
    ("--config.model.top_k=9", "top_k"),
])
def test_bad_override_fails_fast_naming_the_key(override, needle, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke",
         f"--workdir={tmp_path}", override],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
