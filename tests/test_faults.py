"""Fault injection: a run killed with -9 while it writes a checkpoint resumes exactly; damaged checkpoints (truncated
file, missing manifest, bad metadata, a flipped bit) are detected, set aside, and the run falls back to the newest
intact one; a run that diverges keeps (pins) its last healthy checkpoint and resumes from it; evaluation and
sampling take --step and refuse a damaged or missing one in one line.

The other fault scenarios live beside what they test: refused resumes, the workdir lock, late data errors, bad
values and resource sizes (test_train.py), reused convert output directories (test_convert.py), killed and failing
sweep trials (test_sweep.py), the CLIs' one-line errors (test_cli.py)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from grin_jax.train import checkpoint as checkpoint_lib
from grin_jax.train import step as step_module
from grin_jax.train import trainer
from kind_checks import REPO, smoke_config, train_losses


def steps_in(workdir, folder="checkpoints"):
    path = os.path.join(workdir, folder)
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Six steps, a checkpoint every step (the last two kept)."""
    workdir = str(tmp_path_factory.mktemp("full"))
    trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2), workdir)
    return workdir


# ------------------------------------------------------------------------------------------------ checkpoint files
def _truncate_data(step_dir):
    path = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _remove_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _bad_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")


def _flip_a_bit(step_dir):
    path = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


DAMAGES = {"truncated file": _truncate_data, "missing manifest": _remove_manifest, "bad metadata": _bad_metadata,
           "flipped bit": _flip_a_bit}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_damage_is_detected_and_the_newest_intact_step_restored(damage, tmp_path):
    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "step": jnp.int32(7),
             "rng": jax.random.key(3)}
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda x: x, state), {"at": step})
    checkpointer.close()
    DAMAGES[damage](str(tmp_path / "checkpoints" / "2"))
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="step 2: "):
        checkpointer.verify(2)
    checkpointer.verify(1)
    step, restored, meta, damaged = checkpointer.restore_newest(checkpoint_lib.abstract_like(state))
    assert step == 1 and meta == {"at": 1} and [s for s, _ in damaged] == [2]
    assert bool(jnp.all(restored["w"] == state["w"]))
    checkpointer.close()


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(full_run, tmp_path, capfd):
    workdir = str(tmp_path / "run")
    shutil.copytree(full_run, workdir)
    assert steps_in(workdir) == [5, 6]
    _flip_a_bit(os.path.join(workdir, "checkpoints", "6"))
    summary = trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2, steps=7), workdir)
    err = capfd.readouterr().err
    assert "checkpoints/6 is damaged: step 6: state/" in err and "differs from what was written" in err
    assert "resuming from" in err and "(step 5)" in err
    assert summary["steps"] == 7 and steps_in(workdir) == [6, 7]
    assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, "damaged_checkpoints"))] == ["6"]
    assert sorted(train_losses(workdir)) == [1, 2, 3, 4, 5, 6, 7]


def test_when_every_checkpoint_is_damaged_the_run_stops_and_moves_nothing(full_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(full_run, workdir)
    for step in (5, 6):
        _truncate_data(os.path.join(workdir, "checkpoints", str(step)))
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be restored \(step 6: .*; step 5: "):
        trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2, steps=7), workdir)
    assert steps_in(workdir) == [5, 6] and not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


def test_evaluate_and_sample_take_a_step_and_refuse_a_damaged_or_missing_one(full_run, tmp_path, capsys):
    from grin_jax import sample
    from grin_jax.train import evaluate as evaluate_cli
    workdir = str(tmp_path / "run")
    shutil.copytree(full_run, workdir)
    out = str(tmp_path / "eval.json")
    assert evaluate_cli.main([f"--workdir={workdir}", "--step=5", "--max_batches=2", f"--out={out}"]) == 0
    assert capsys.readouterr().out.startswith("step 5: validation loss ")
    with open(out) as f:
        at_5 = json.load(f)
    _remove_manifest(os.path.join(workdir, "checkpoints", "6"))
    with pytest.raises(ValueError, match=r"checkpoint step 6: state/manifest.ocdbt is missing"):
        evaluate_cli.evaluate_checkpoint(workdir, step=6, max_batches=2)
    with pytest.raises(ValueError, match=r"step=3 is invalid: .* holds steps \[5, 6\]"):
        evaluate_cli.evaluate_checkpoint(workdir, step=3, max_batches=2)
    newest = evaluate_cli.evaluate_checkpoint(workdir, max_batches=2)  # the newest intact: 5, left in place
    assert newest["step"] == 5 and newest["loss"] == at_5["loss"] and steps_in(workdir) == [5, 6]
    assert sample.main(["sample", f"--workdir={workdir}", "--max_new_tokens=3"]) == 0


# ------------------------------------------------------------------------------------------------ divergence
def test_a_diverging_run_pins_its_last_healthy_checkpoint_and_resumes_from_it(tmp_path, monkeypatch):
    """The logged loss explodes (finite) from step 4 and is NaN at step 6; a checkpoint every step, two kept.
    Steps 4 and 5 are saved but diverging; step 3, the last healthy one, is pinned (kept although two newer ones
    exist), the diverging ones are set aside and the rerun, with a lower learning rate, resumes from step 3."""
    make_train_step = step_module.make_train_step

    def exploding(graphdef, tx, grad_accum_steps=1):
        inner = make_train_step(graphdef, tx, grad_accum_steps)

        def train_step(state, batch):
            new_state, metrics = inner(state, batch)
            step = state["step"] + 1
            metrics["loss"] = jnp.where(step >= 6, jnp.nan, jnp.where(step >= 4, 1e8 * step, metrics["loss"]))
            return new_state, metrics

        return train_step

    workdir = str(tmp_path / "run")
    monkeypatch.setattr(step_module, "make_train_step", exploding)
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 6; the run stopped: rerunning resumes from the "
                       r"last healthy checkpoint, step 3 \(loss [0-9.]+\); the later ones \(steps \[4, 5\]\) were "
                       r"diverging"):
        trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2, eval_every=0), workdir)
    assert steps_in(workdir) == [3]
    assert sorted(int(d.split("-")[0]) for d in os.listdir(os.path.join(workdir, "diverged_checkpoints"))) == [4, 5]
    monkeypatch.setattr(step_module, "make_train_step", make_train_step)
    summary = trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2, eval_every=0,
                                         learning_rate=1e-3), workdir)
    assert summary["steps"] == 6 and sorted(train_losses(workdir)) == [1, 2, 3, 4, 5, 6]
    assert summary["final_train_loss"] < 10


# ------------------------------------------------------------------------------------------------ kill -9
def test_kill_9_while_checkpointing_resumes_exactly(full_run, tmp_path):
    """A trainer process killed with SIGKILL as soon as its first checkpoint directory appears (the asynchronous
    write of step 1 or 2 in flight, or just done) resumes to the uninterrupted run's losses."""
    workdir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke", f"--workdir={workdir}",
               "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
               "--config.train.final_eval_batches=2", "--config.train.progress=False"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if glob.glob(os.path.join(workdir, "checkpoints", "*")):
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"
    summary = trainer.train(smoke_config(checkpoint_every=1, keep_checkpoints=2), workdir)
    expected, resumed = train_losses(full_run), train_losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), step
