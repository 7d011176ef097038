"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 fake devices each) run
`python -m grin_jax.train` on a (data, expert, model) = (2, 2, 2) mesh spanning both, and agree with one process
on 8 devices running the same train steps on the same global batches.

Each process loads its half of the global batch (train.batch_size is global; grain shards the documents by
process), so the one-process reference assembles the same global batches from the two per-process iterators.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from grin_jax import data as _data
from grin_jax import sharding
from grin_jax.train import metrics as _metrics
from grin_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grin_tiny  # noqa: E402

assert jax.device_count() >= 8, "these tests need 8 (fake) CPU devices: see tests/conftest.py"

STEPS = 2
OVERRIDES = {  # a one-layer smoke model with 8 heads, B x S = 8 x 16, on a (2, 2, 2) mesh
    "model.num_layers": 1, "model.num_heads": 8, "model.head_dim": 8, "model.moe.router_options.jitter_eps": 0.3,
    "data.seq_len": 16, "train.batch_size": 8, "train.steps": STEPS, "train.eval_every": 0,
    "train.eval_batches": 1, "train.checkpoint_every": 0, "train.compilation_cache_dir": "none",
    "mesh.data": 2, "mesh.expert": 2, "mesh.model": 2,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, process_id, port, overrides=None):
    args = [sys.executable, "-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke", f"--workdir={workdir}"]
    args += [f"--config.{key}={value}" for key, value in {**OVERRIDES, **(overrides or {})}.items()]
    args += [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
             f"--config.distributed.process_id={process_id}", "--config.distributed.initialization_timeout=120"]
    # XLA's CPU backend at optimisation level 0 (as the reference): the SPMD program is the same, compiles 2x faster.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def reference_losses():
    """One process, 8 devices: the trainer's sharded init and train step on the global batches the two processes
    assemble (rows 0-3 from process 0's iterator, 4-7 from process 1's)."""
    config = grin_tiny.get_config("smoke")
    for key, value in OVERRIDES.items():
        *path, field = key.split(".")
        node = config
        for name in path:
            node = node[name]
        node[field] = value
    experiment = trainer.resolve(config)
    mesh = sharding.make_mesh(config.mesh)
    tc = config.train
    from grin_jax.train import optim
    tx, _ = optim.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                                 weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, clip_norm=tc.clip_norm,
                                 final_lr_fraction=tc.final_lr_fraction)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    # The processes create the state with the sharded (jitted) initialiser: equal to the eager one to ~1e-8
    # (test_sharding), which is cheaper here (its initialisers are cached).
    graphdef, state = trainer.init_state(experiment, tx)
    state = jax.device_put(state, shardings)
    step = trainer.compile_train_step(graphdef, tx, state, shardings, mesh,
                                      trainer.batch_spec(tc.batch_size, config.data.seq_len),
                                      compiler_options={"xla_backend_optimization_level": 0})
    iterators = [_data.make_dataset(config.data, batch_size=tc.batch_size // 2, seed=tc.seed, process_index=i,
                                    process_count=2)[0] for i in range(2)]
    losses = []
    for _ in range(STEPS):
        halves = [trainer._device_batch(next(it)) for it in iterators]
        host = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
        state, metrics = step(state, sharding.global_batch(host, mesh, tc.batch_size))
        losses.append(float(metrics["loss"]))
    return losses


def test_two_processes_agree_with_one(tmp_path):
    workdir = str(tmp_path / "run")
    port = free_port()
    procs = [launch(workdir, i, port) for i in range(2)]
    try:
        expected = reference_losses()  # computed while the two processes start and compile
        outputs = [p.communicate(timeout=540)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    records = _metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))  # written by process 0 only
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == STEPS
    print(f"2 processes {losses} vs 1 process {expected}: max |d loss| "
          f"{np.max(np.abs(np.subtract(losses, expected))):.2e}")
    np.testing.assert_allclose(losses, expected, atol=1e-5, rtol=0)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 8 * 16
    assert np.isfinite(summary["validation_loss"])
    # One multi-host Orbax checkpoint (both processes wrote their shards), with both data slices' iterator states.
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(d for d in os.listdir(checkpoints) if d.isdigit()) == [str(STEPS)]
    with open(os.path.join(checkpoints, str(STEPS), "meta", "metadata")) as f:
        meta = json.load(f)
    assert len(meta["data_states"]) == 2


def test_a_stalled_peer_stops_every_process_within_the_heartbeat_timeout(tmp_path):
    """Process 1 is frozen (SIGSTOP) mid-run: process 0 must fail within distributed.heartbeat_timeout (5 s here)
    plus slack, naming the unhealthy task, instead of waiting in a collective for minutes."""
    workdir = str(tmp_path / "run")
    port = free_port()
    long_run = {"train.steps": 100000, "train.log_every": 1, "train.progress": False,
                "distributed.heartbeat_timeout": 5, "distributed.shutdown_timeout": 5}
    procs = [launch(workdir, i, port, long_run) for i in range(2)]
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if any("train/loss" in r for r in _metrics.read_jsonl(metrics)):
                break
            time.sleep(0.5)
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        output = procs[0].communicate(timeout=120)[0]
        elapsed = time.time() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in output, output[-3000:]
    assert elapsed < 5 + 40, f"process 0 took {elapsed:.0f} s to stop"
