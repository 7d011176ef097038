"""The trainer: runs, resumes exactly, writes its outputs (the final validation loss over the whole split with its
standard error, where the data stream is, the code's git commit), rejects bad configs before compiling."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from grin_jax import data as data_lib
from grin_jax import models
from grin_jax.scaling import summary as scaling_summary
from grin_jax.train import provenance
from grin_jax.train import step as step_module
from grin_jax.train import trainer
from grin_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
sys.path.insert(0, CONFIGS)

import grin_tiny  # noqa: E402
from kind_checks import smoke_config, train_losses  # noqa: E402


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
    # The model's aux losses and metrics are logged under their own names (no prefix added by the trainer).
    first = next(r for r in records if "train/loss" in r)
    for key in ("train/total_loss", "train/aux_loss", "train/grad_norm", "train/moe/load_balance_loss",
                "train/moe/z_loss", "train/moe/router_entropy", "train/learning_rate", "train/tokens_per_second"):
        assert isinstance(first.get(key), float), key
    # Where the data stream was after each logged step's batch: rows seen / rows per epoch of the train split.
    rows_per_epoch = len(data_lib.packed_rows(smoke_config().data))
    for r in (r for r in records if "train/loss" in r):
        assert r["data/epoch"] == 0
        assert r["data/corpus_fraction"] == pytest.approx(r["step"] * 4 / rows_per_epoch, rel=1e-12)
    evals = [r for r in records if "eval/loss" in r]
    assert [(r["step"], r["eval/final"]) for r in evals] == [(3, False), (6, True)]
    for r in evals:  # 2 batches of 4 x 32 tokens: inside the split's first document (stderr needs two)
        assert r["eval/documents"] == 1 and r["eval/stderr"] is None and r["eval/tokens"] == 2 * 4 * 32


SUMMARY_KEYS = {  # read by grin_jax.sweep, grin_jax.scaling.fit, experiments/granularity/analyze.py
    "config_name", "steps", "tokens_seen", "final_train_loss", "smoothed_train_loss", "validation_loss",
    "validation_bits_per_byte", "wall_seconds", "params", "plots", "compile_seconds", "tokens_per_second",
    "xla_flops_per_token", "paper_flops_per_token", "N", "D", "G", "loss", "flops",
    "validation_loss_stderr", "validation_documents", "corpus_fraction", "git_commit", "git_dirty"}


def test_summary_keys_and_scaling_columns(full_run):
    workdir, summary = full_run
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert set(on_disk) == SUMMARY_KEYS == set(summary)
    assert on_disk["validation_documents"] == 1 and on_disk["validation_loss_stderr"] is None  # see above
    assert on_disk["git_commit"] == provenance.git_provenance()["git_commit"]
    assert on_disk["corpus_fraction"] == pytest.approx(6 * 4 / len(data_lib.packed_rows(smoke_config().data)))
    counts = on_disk["params"]
    assert on_disk["D"] == on_disk["tokens_seen"] and on_disk["G"] == 1
    assert on_disk["loss"] == on_disk["smoothed_train_loss"]
    assert on_disk["N"] == counts["non_embedding"] - counts["router"] - counts["norms"]
    assert on_disk["paper_flops_per_token"] == pytest.approx(
        6 * (counts["active_non_embedding"] - counts["router"]) + 14 * counts["router"])
    assert on_disk["flops"] == pytest.approx(on_disk["paper_flops_per_token"] * on_disk["D"])


def test_granularity_read_from_either_model_layout():
    assert scaling_summary.granularity_of(ml_collections.ConfigDict({"moe": {"granularity": 4}})) == 4
    assert scaling_summary.granularity_of(ml_collections.ConfigDict({"granularity": 2, "d_model": 8})) == 2
    assert scaling_summary.granularity_of({"moe": {"top_k": 2}, "granularity": 8}) == 8
    assert scaling_summary.granularity_of(ml_collections.ConfigDict({"d_model": 8})) == 1


def test_killed_run_resumes_step_for_step(full_run, tmp_path, monkeypatch):
    full_workdir, _ = full_run
    workdir = str(tmp_path / "resumed")
    calls = {"n": 0}
    original = trainer._device_batch

    def crash_after_five(batch, *args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated kill")
        return original(batch, *args)

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
    positions = {r["step"]: r["data/corpus_fraction"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                 if "train/loss" in r}
    assert positions == {r["step"]: r["data/corpus_fraction"]
                         for r in read_jsonl(os.path.join(full_workdir, "metrics.jsonl")) if "train/loss" in r}


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A 1e30 learning rate without clipping blows the parameters up within a few steps; checkpoints are written
    # every step until then. The run must stop at the first non-finite loss and keep the previous step's checkpoint.
    config = smoke_config(checkpoint_every=1, learning_rate=1e30, clip_norm=0.0, warmup_steps=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(trainer.NonFiniteLossError, match="last healthy checkpoint") as error:
        trainer.train(config, workdir)
    failed_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert f"checkpoint, step {failed_step - 1} (loss" in str(error.value)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] == failed_step - 1
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_host_reads_step_metrics_only_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    # The loop must not wait for step N on the host before step N + 1 is queued on the device: record every
    # dispatch of the compiled train step and which step's metrics every host read (_host_metrics) pulls.
    events, step_of, alive = [], {}, []
    compile_train_step, host_metrics = trainer.compile_train_step, trainer._host_metrics

    class Recording:
        def __init__(self, compiled):
            self.compiled = compiled

        def __getattr__(self, name):  # cost_analysis, ...
            return getattr(self.compiled, name)

        def __call__(self, state, batch):
            new_state, metrics = self.compiled(state, batch)
            alive.append(metrics)  # keeps the ids unique
            step_of[id(metrics["loss"])] = len(alive)
            events.append(("dispatch", len(alive)))
            return new_state, metrics

    def reading(metrics):
        events.append(("read", step_of[id(metrics["loss"])]))
        return host_metrics(metrics)

    monkeypatch.setattr(trainer, "compile_train_step", lambda *a, **k: Recording(compile_train_step(*a, **k)))
    monkeypatch.setattr(trainer, "_host_metrics", reading)
    # Eval and checkpoint only at the end (they read the pending step first); log every other step.
    summary = trainer.train(smoke_config(checkpoint_every=0, eval_every=0, log_every=2), str(tmp_path / "run"))
    expected = [("dispatch", 1)]
    for n in range(1, 6):
        expected += [("dispatch", n + 1), ("read", n)]
    assert events == expected + [("read", 6)]
    assert sorted(train_losses(str(tmp_path / "run"))) == [2, 4, 6] and summary["steps"] == 6


@pytest.mark.parametrize("bad_step", [3, 4])
def test_nonfinite_loss_read_late_is_never_checkpointed(bad_step, tmp_path, monkeypatch):
    # Checkpoints every 2 steps; the loss of `bad_step` is NaN while its state stays finite, so only the loss
    # check can stop it. Step 3's loss is read after step 4 is dispatched, step 4's before step 4 is saved:
    # either way the run stops naming the bad step and the kept checkpoint (step 2) precedes it.
    make_train_step = step_module.make_train_step

    def poisoned(graphdef, tx, grad_accum_steps=1):
        inner = make_train_step(graphdef, tx, grad_accum_steps)

        def train_step(state, batch):
            new_state, metrics = inner(state, batch)
            metrics["loss"] = jnp.where(state["step"] == bad_step - 1, jnp.nan, metrics["loss"])
            return new_state, metrics

        return train_step

    monkeypatch.setattr(step_module, "make_train_step", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(trainer.NonFiniteLossError, match=f"at step {bad_step}") as error:
        trainer.train(smoke_config(checkpoint_every=2, eval_every=0), workdir)
    assert "healthy checkpoint, step 2 (loss" in str(error.value)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [2] and steps[-1] < bad_step
    assert sorted(train_losses(workdir)) == list(range(1, bad_step))  # the bad step is not logged
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
    ("--config.model.moe.top_k=9", "top_k"),
])
def test_bad_override_fails_fast_naming_the_key(override, needle, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke",
         f"--workdir={tmp_path}", override],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.parametrize("override,needle", [
    ("--config.data.eval_split=nope", "split='nope' is invalid"),   # raised inside train(), after resolve()
    ("--config.model.d_model=-3", "model.d_model=-3 is invalid"),   # raised by resolve()
])
def test_train_cli_answers_user_errors_in_one_line(override, needle, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke",
         f"--workdir={tmp_path}", override],
        cwd=REPO, env={k: v for k, v in os.environ.items() if k != "GRIN_JAX_DEBUG"},
        capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (first,) = [i for i, line in enumerate(lines) if line.startswith("error: ")]  # after notes such as the mesh's
    assert needle in lines[first] and len(lines) - first <= 2, result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_a_torn_metrics_line_keeps_the_later_records(tmp_path, capsys):
    """A line torn by a crash or a full disk, in the middle of metrics.jsonl: the records after it are read, the
    skipped line is reported naming the file, and a resumed MetricWriter rewrites the log without it."""
    from grin_jax.train.metrics import MetricWriter
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/loss": 5.0 - s} for s in range(1, 7)]
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2][:12]                                   # step 3: torn
    lines.insert(4, "\x00\x00 not json")                       # damaged bytes
    path.write_text("\n".join(lines) + "\n")
    kept = [r for r in records if r["step"] != 3]
    assert read_jsonl(str(path)) == kept
    err = capsys.readouterr().err
    assert str(path) in err and "skipped 2 unreadable lines" in err
    writer = MetricWriter(str(tmp_path), resume_step=5, tensorboard=False)
    writer.write(6, {"train/loss": 0.5})
    writer.close()
    capsys.readouterr()
    assert read_jsonl(str(path)) == [r for r in kept if r["step"] <= 5] + [{"step": 6, "train/loss": 0.5}]
    assert capsys.readouterr().err == ""  # the rewritten log has no unreadable line left


def test_resumed_after_the_final_step_summarises_without_logging_twice(full_run, tmp_path):
    full_workdir, summary = full_run
    workdir = str(tmp_path / "copy")
    shutil.copytree(full_workdir, workdir)
    os.remove(os.path.join(workdir, "summary.json"))  # killed after the final checkpoint, before the summary
    again = trainer.train(smoke_config(checkpoint_every=2), workdir)
    assert again["steps"] == 6 and again["validation_loss"] == pytest.approx(summary["validation_loss"], abs=1e-6)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert records == read_jsonl(os.path.join(full_workdir, "metrics.jsonl"))  # nothing logged twice


def small_corpus_config(tmp_path, **data):
    """The smoke model on a corpus of 300 short JSONL documents (many per 32-token row); the final evaluation
    covers the whole validation split (train.final_eval_batches = 0, the default)."""
    lines = [json.dumps({"text": f"doc {i}: " + "abcdefghij"[: i % 11] * (1 + i % 3)}) for i in range(300)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    config = grin_tiny.get_config("smoke")
    config.data.name, config.data.paths = "text", str(tmp_path / "d.jsonl")
    config.data.data_dir = str(tmp_path / "data_dir")
    for key, value in data.items():
        config.data[key] = value
    config.train.steps, config.train.eval_every, config.train.checkpoint_every = 2, 0, 0
    config.train.warmup_steps = 1
    config.train.final_eval_batches = 0  # the whole split (the default; the smoke preset shortens it)
    return config


_apply = jax.jit(models.apply, static_argnames=("graphdef", "training"))


def _token_nll(logits_BSV, targets_BS):
    logp = jax.nn.log_softmax(logits_BSV, axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets_BS)[..., None], axis=-1)[..., 0])


def _scored_by_hand(config, graphdef, params, tokenizer):
    """(DocumentLosses of the validation split scored as packed documents, {doc: number of rows it spans})."""
    acc, rows_of = data_lib.DocumentLosses(), {}
    for b in data_lib.eval_batches(config.data, batch_size=config.train.batch_size, tokenizer=tokenizer):
        logits, _ = _apply(graphdef, params, jnp.asarray(b["inputs"]), positions_BS=jnp.asarray(b["positions"]),
                           segment_ids_BS=jnp.asarray(b["segment_ids"]))
        acc.add(b["doc_ids"], _token_nll(logits, b["targets"]), b["loss_mask"])
        for row in b["doc_ids"]:
            for d in set(row[row >= 0].tolist()):
                rows_of[d] = rows_of.get(d, 0) + 1
    return acc, rows_of


def _nll_alone(graphdef, params, encoded, eos_id, pad_id):
    """Summed NLL of each document evaluated alone (`EOS d EOS`, padded at the end; no packing)."""
    length = max(len(e) for e in encoded) + 2
    rows = np.full((len(encoded), length), pad_id, np.int32)
    mask = np.zeros((len(encoded), length - 1), np.float32)
    for i, e in enumerate(encoded):
        rows[i, :len(e) + 2] = np.concatenate([[eos_id], e, [eos_id]])
        mask[i, :len(e) + 1] = 1.0
    logits, _ = _apply(graphdef, params, jnp.asarray(rows[:, :-1]))
    return (_token_nll(logits, rows[:, 1:]) * mask).sum(axis=1)


def test_final_eval_covers_the_whole_split_with_its_stderr(tmp_path):
    config = small_corpus_config(tmp_path)
    workdir = str(tmp_path / "run")
    summary = trainer.train(config, workdir)
    split = data_lib.split_statistics(config.data)
    assert 30 <= split["documents"] < 100
    assert summary["validation_documents"] == split["documents"]
    final = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/loss" in r]
    assert len(final) == 1 and final[0]["eval/final"] and final[0]["eval/tokens"] == split["tokens"]
    assert summary["validation_bits_per_byte"] == pytest.approx(
        summary["validation_loss"] * split["tokens"] / split["bytes"] / math.log(2), rel=1e-9)
    # The loss and its standard error over documents, computed here from the data helpers and the model.
    _, graphdef, params, tokenizer = trainer.load_trained(workdir)
    acc, rows_of = _scored_by_hand(config, graphdef, params, tokenizer)
    by_hand = acc.stats()
    assert by_hand["documents"] == split["documents"]
    assert summary["validation_loss"] == pytest.approx(by_hand["loss"], rel=1e-6)
    assert summary["validation_loss_stderr"] == pytest.approx(by_hand["stderr"], rel=1e-5)
    assert 0 < summary["validation_loss_stderr"] < 0.5
    # Packing is invisible: a document inside one packed row scores as it does alone.
    docs = data_lib.documents(config.data, "validation")
    whole = [d for d, n in sorted(rows_of.items()) if n == 1]
    assert len(whole) >= 10
    alone = _nll_alone(graphdef, params, [np.asarray(tokenizer.encode(docs[d]), np.int32) for d in whole],
                       tokenizer.eos_id, tokenizer.pad_id)
    np.testing.assert_allclose(acc.nll[whole], alone, rtol=1e-5, atol=1e-4)
    # data.document_attention=False: rows attend across documents with positions 0..S-1, as before; the device
    # batch has no positions / segment ids and the loss differs.
    config.data.document_attention = False
    trainer.resolve(config)
    leaky = trainer.evaluate(jax.jit(trainer.make_eval_step(graphdef)), params, config, tokenizer, max_batches=None)
    assert leaky["documents"] == split["documents"] and abs(leaky["loss"] - summary["validation_loss"]) > 1e-3
    batch = next(iter(data_lib.eval_batches(config.data, batch_size=2, tokenizer=tokenizer)))
    assert set(trainer._device_batch(batch, False)) == {"inputs", "targets", "loss_mask"}
    assert set(trainer._device_batch(batch)) == set(trainer.batch_spec(2, 32)) == set(data_lib.FEATURES)


def test_provenance_is_the_package_checkout_or_null(tmp_path):
    assert provenance.git_provenance(str(tmp_path)) == {"git_commit": None, "git_dirty": None}
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    found = provenance.git_provenance()
    if head.returncode != 0:  # not a checkout (an sdist, an installed copy)
        assert found == {"git_commit": None, "git_dirty": None}
        return
    status = subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True,
                            env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    assert found == {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def test_loss_mean_averages_every_step_and_feeds_the_smoothed_loss(full_run, tmp_path):
    """train/loss_mean of a record is the mean loss of every step since the previous record (the host reads each
    step anyway), and smoothed_train_loss averages those over the last 10 % of records."""
    workdir, _ = full_run  # log_every = 1: the per-step losses of the same seed and data
    per_step = train_losses(workdir)
    summary = trainer.train(smoke_config(log_every=3, checkpoint_every=0, eval_every=0), str(tmp_path))
    records = {r["step"]: r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "train/loss" in r}
    assert sorted(records) == [3, 6]
    for step in (3, 6):
        expected = np.mean([per_step[s] for s in range(step - 2, step + 1)])
        assert records[step]["train/loss_mean"] == pytest.approx(expected, rel=1e-6)
    assert summary["smoothed_train_loss"] == pytest.approx(records[6]["train/loss_mean"], rel=1e-6)


def test_sample_cli_picks_a_step_and_rejects_bad_flags_in_one_line(full_run, capsys):
    from grin_jax.sample import main
    workdir, _ = full_run  # checkpoints at steps 2, 4, 6 (keep 2: 4 and 6)
    for flag in ("--num_samples=0", "--max_new_tokens=0", "--temperature=-1", "--top_p=0", "--temperature=nan"):
        assert main(["sample", f"--workdir={workdir}", flag]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("error: --") and err.count("\n") == 1, err
    assert main(["sample", f"--workdir={workdir}", "--step=4", "--max_new_tokens=4", "--num_samples=2"]) == 0


def test_a_workdir_is_one_run_refused_resumes_leave_it_intact(full_run, tmp_path):
    """A changed model, batch or data config is refused before anything is written, naming the differing keys;
    config.json (the record of the run) is untouched; changing train.steps resumes."""
    full_workdir, _ = full_run
    workdir = str(tmp_path / "copy")
    shutil.copytree(full_workdir, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        record = f.read()
    changed = smoke_config(checkpoint_every=2)
    changed.model.d_model = 32
    changed.model.head_dim = 8
    changed.train.batch_size = 8
    with pytest.raises(ValueError, match=r"holds a run with another config \(model.d_model: 64 -> 32; "
                                         r"model.head_dim: 16 -> 8; train.batch_size: 4 -> 8\)"):
        trainer.train(changed, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == record
    longer = trainer.train(smoke_config(checkpoint_every=2, steps=7), workdir)  # train.steps may change
    assert longer["steps"] == 7


def test_train_cli_requires_a_workdir():
    result = subprocess.run([sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--workdir is required" in result.stderr


def test_a_bad_eval_split_stops_the_run_before_training(tmp_path):
    config = smoke_config()
    config.data.eval_split = "nope"
    with pytest.raises(ValueError, match=r"split='nope' is invalid"):
        trainer.train(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))  # no training step was taken


@pytest.mark.parametrize("section,key,value,needle", [
    ("train", "batch_size", 10**9, "train.batch_size=1000000000 is too large for this machine"),
    ("data", "shuffle_windows", 10**12, "data.shuffle_windows=1000000000000 is too large for this machine"),
])
def test_resource_sizes_bounded_against_the_machine(section, key, value, needle):
    config = smoke_config()
    config.data.shuffle = "windows"
    config[section][key] = value
    with pytest.raises(ValueError, match=needle):
        trainer.resolve(config, check_mesh=False)


def test_a_checkpoints_file_is_refused_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match=r"checkpoints exists and is not a directory"):
        trainer.train(smoke_config(), str(tmp_path))


def test_a_running_workdir_is_locked_and_a_stale_lock_is_taken_over(tmp_path):
    """A second trainer on a workdir whose lock holder is alive is refused; a lock whose process is gone (killed
    with -9, say) is stale and taken over; the lock is released when the run ends."""
    import socket
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": 0}))
        with pytest.raises(RuntimeError, match=rf"is in use by process {holder.pid}"):
            trainer.train(smoke_config(steps=1, warmup_steps=0, eval_every=0, checkpoint_every=0), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    summary = trainer.train(smoke_config(steps=1, warmup_steps=0, eval_every=0, checkpoint_every=0), str(tmp_path))  # stale: taken
    assert summary["steps"] == 1 and not lock.exists()


def test_keep_freed_buffers_applies_before_the_backend_and_can_be_turned_off(monkeypatch):
    """trainer.keep_freed_buffers (mallopt on glibc: XLA's per-step temporaries reused, not re-mapped and
    zero-filled) applies in a fresh process before JAX starts its backend, changes nothing once the backend is up
    (this process), and $GRIN_JAX_MALLOC=0 turns it off."""
    code = "from grin_jax.train import trainer; print(trainer.keep_freed_buffers())"
    env = {k: v for k, v in os.environ.items() if k != trainer.MALLOC_ENV}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert fresh.stdout.strip() == str(sys.platform.startswith("linux"))
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, trainer.MALLOC_ENV: "0"})
    assert off.stdout.strip() == "False"
    jax.devices()
    assert trainer.keep_freed_buffers() is False
