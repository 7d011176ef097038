"""grin_jax.plan on 8 fake CPU devices (conftest.py): exact per-device state bytes against a hand count from the
shapes, the HLO analysis (loop trip counts, collectives) on programs whose answer is known, the CLI's rows for a
data-parallel and an fsdp mesh, and its one-line errors for impossible layouts.

The tiny model (grin_tiny:smoke): vocab V=259 (byte tokenizer: divisible by no mesh axis > 1, so replicated),
d_model D=64, 4 query / 2 KV heads of 16, LayerNorm (scale + bias), q/k/v/o biases, LM head with bias, every layer
an MoE of E=8 SwiGLU experts of width F=64 and a router [D, E]. One CLI run compiles two layouts (data=8, fsdp=8) at
XLA's backend optimisation level 0 (the partitioned HLO and buffer sizes are the same, LLVM does less).
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grin_jax import plan, sharding
from grin_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import grin_tiny  # noqa: E402

assert jax.device_count() >= 8, "these tests need 8 (fake) CPU devices: see tests/conftest.py"

TINY = os.path.join(REPO, "configs", "grin_tiny.py") + ":smoke"
V, D, H, KV, HD, E, F = 259, 64, 4, 2, 16, 8, 64
F32 = 4
ADAM_COUNTERS = 2 * 4  # optax adamw with a schedule: Adam's count and the schedule's count, int32 scalars
BATCH, SEQ = 8, 16


def param_elements(layers: int, fsdp: int = 1, model: int = 1, expert: int = 1) -> int:
    """Parameters one device holds, counted by hand: D split over fsdp in every array that has it; heads, KV heads
    and expert width F over the model axis; experts E (expert weights and the router's columns) over the expert
    axis; the vocabulary (259) never split."""
    d, h, kv, f, e = D // fsdp, H // model, KV // model, F // model, E // expert
    embed = V * d
    lm_head = d * V + V                        # kernel [D, V] + bias [V] (replicated)
    final_norm = 2 * d
    layer = (4 * d                             # input / post-attention LayerNorm: scale, bias [D]
             + d * h * HD + h * HD             # q kernel [D, H, K], bias [H, K]
             + 2 * (d * kv * HD + kv * HD)     # k, v kernels [D, G, K], biases [G, K]
             + h * HD * d + d                  # o kernel [H, K, D], bias [D]
             + d * e                           # router [D, E]
             + 3 * e * d * f)                  # w_gate, w_up [E, D, F], w_down [E, F, D]
    return embed + lm_head + final_norm + layers * layer


def replicated_elements(layers: int) -> int:
    """Arrays without a D dimension (not split by fsdp): the LM head bias and the q/k/v biases."""
    return V + layers * (H * HD + 2 * KV * HD)


def tiny_plan(layers: int = 1, **model):
    c = grin_tiny.get_config("smoke")
    c.model.num_layers = layers
    for key, value in model.items():
        c.model[key] = value
    return plan.prepare(c, batch_size=BATCH, seq_len=SEQ)


def state_bytes_on(p, mesh_sizes: dict) -> dict:
    tx, _ = trainer.make_optimizer(p.config.train, p.experiment.model)
    _, state = trainer.abstract_state(p.experiment, tx)
    mesh = sharding.make_mesh(mesh_sizes, devices=jax.devices()[:8])
    return plan.state_bytes(state, sharding.state_shardings(state, mesh))


# ------------------------------------------------------------------------------------------------ state bytes
def test_hand_count_is_the_model():
    """The hand count is the tiny model's parameter count (so the per-device checks below test the sharding)."""
    assert tiny_plan(1).total_params == param_elements(1) == 145_091
    assert tiny_plan(2).total_params == param_elements(2)


@pytest.mark.parametrize("mesh, layers, scan", [
    ({"data": 8}, 1, False),
    ({"data": 1, "fsdp": 8}, 1, False),
    ({"data": 1, "fsdp": 4, "model": 2}, 2, True),   # scanned layers: [L, ...] stacks, the same split per layer
    ({"data": 2, "fsdp": 2, "expert": 2}, 2, True),  # experts over 'expert', and D/2
])
def test_state_bytes_per_device_equal_the_hand_count(mesh, layers, scan):
    p = tiny_plan(layers, scan_layers=scan)
    held = state_bytes_on(p, mesh)
    expected = param_elements(layers, mesh.get("fsdp", 1), mesh.get("model", 1), mesh.get("expert", 1))
    assert held["params"] == expected * F32
    assert held["opt_state"] == 2 * expected * F32 + ADAM_COUNTERS  # mu, nu (float32, laid out as the params)
    assert held["other"] == 4 + 8  # the step (int32) and the key (2 x uint32)


def test_fsdp_divides_what_has_d_model():
    p = tiny_plan(1)
    one, split = state_bytes_on(p, {"data": 8})["params"], state_bytes_on(p, {"data": 1, "fsdp": 8})["params"]
    rep = replicated_elements(1) * F32
    assert split - rep == (one - rep) // 8          # exactly 1/8 of every array with a D dimension
    assert 7.5 < one / split < 8                    # ~8 overall (the small biases stay whole)


def test_mixed_precision_state_is_float32():
    """param_dtype float32 with bfloat16 compute: parameters and both Adam moments are float32."""
    p = tiny_plan(1, dtype="bfloat16", activation_dtype="bfloat16")
    assert state_bytes_on(p, {"data": 8})["params"] == param_elements(1) * F32


# ------------------------------------------------------------------------------------------------ HLO analysis
def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_analyse_hlo_counts_loop_bodies_times_their_trip_count():
    x = jnp.zeros((32, 48), jnp.float32)
    w = jnp.zeros((48, 48), jnp.float32)

    def f(x, w):
        return jax.lax.fori_loop(0, 7, lambda i, h: jnp.tanh(h @ w), x)

    analysis = plan.analyse_hlo(_compile(f, x, w).as_text())
    assert analysis["dot_flops"] == 7 * 2 * 32 * 48 * 48
    assert analysis["loops"] >= 1 and analysis["unknown_trip_loops"] == 0
    assert analysis["dot_flops_in_unknown_loops"] == 0


def test_analyse_hlo_flags_loops_of_data_dependent_length():
    """A loop whose trip count is a runtime value: its body is counted once, and reported as such."""
    x = jnp.zeros((32, 48), jnp.float32)
    w = jnp.zeros((48, 48), jnp.float32)

    def f(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x) @ w

    analysis = plan.analyse_hlo(_compile(f, x, w, jnp.int32(5)).as_text())
    one = 2 * 32 * 48 * 48
    assert analysis["unknown_trip_loops"] == 1
    assert analysis["dot_flops"] == 2 * one and analysis["dot_flops_in_unknown_loops"] == one


def test_analyse_hlo_collectives_on_a_mesh():
    """A scan of 3 steps, each an all-gather of a [2, 16] float32 shard over 4 devices and a psum of [8, 16]."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])

    def body(c, _):
        full = jax.lax.all_gather(c, "x", tiled=True)           # [8, 16] from [2, 16]
        return c + 1.0, jax.lax.psum(full, "x")

    def f(x):
        return jax.lax.scan(body, x, None, length=3)[1]

    shard_f = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P())
    x = jax.device_put(jnp.zeros((8, 16), jnp.float32), NamedSharding(mesh, P("x")))
    analysis = plan.analyse_hlo(_compile(shard_f, x).as_text())
    ag, ar = analysis["collectives"]["all-gather"], analysis["collectives"]["all-reduce"]
    assert ag["executed"] == 3 and ag["bytes"] == 3 * 2 * 16 * 4        # operand: the [2, 16] shard
    assert ar["executed"] == 3 and ar["bytes"] == 3 * 8 * 16 * 4        # operand: the gathered [8, 16]
    assert ag["traffic"] == 3 * (4 - 1) * 2 * 16 * 4                    # ring: send the shard to 3 others
    assert ar["traffic"] == 3 * 2 * 3 * 8 * 16                          # ring: 2 (g-1)/g x 512 bytes
    assert analysis["collectives"]["all-to-all"]["executed"] == 0


def test_shape_bytes_and_group_sizes():
    assert plan.shape_bytes("f32[8,64]{1,0}") == 8 * 64 * 4
    assert plan.shape_bytes("(bf16[2,3]{1,0}, s32[], pred[4])") == 12 + 4 + 4
    assert plan._group_size("x, replica_groups={{0},{1},{2}}, y") == 1
    assert plan._group_size("replica_groups=[2,4]<=[8]") == 4
    assert plan._group_size("replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0','axis_1'}, dims") == 16


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One in-process CLI run: data=8 and fsdp=8 on the one-layer tiny model; (status, stdout, md, json)."""
    out = tmp_path_factory.mktemp("plan") / "tiny.md"
    capture = _Capture()
    with capture:
        status = plan.main(["plan", f"--config={TINY}", "--config.model.num_layers=1", "--devices=8",
                            "--mesh=data=8;fsdp=8", f"--batch_size={BATCH}", f"--seq_len={SEQ}", "--fast_compile",
                            f"--out={out}"])
    with open(out) as f:
        markdown = f.read()
    with open(str(out)[:-3] + ".json") as f:
        payload = json.load(f)
    return status, capture.stdout, markdown, payload, out.parent


class _Capture:
    """stdout / stderr of a block (a module-scoped fixture cannot use capsys)."""

    def __enter__(self):
        import io
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.stdout, self.stderr = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._saved
        return False


def test_cli_rows_hold_the_exact_state_bytes(cli_run):
    status, _, _, payload, _ = cli_run
    assert status == 0
    data, fsdp = payload["rows"]
    assert (data["layout"], fsdp["layout"]) == ("data=8", "fsdp=8")
    assert data["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
    assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "model": 1}
    for row, fsdp_size in ((data, 1), (fsdp, 8)):
        assert row["param_bytes"] == param_elements(1, fsdp_size) * F32
        assert row["opt_state_bytes"] == 2 * row["param_bytes"] + ADAM_COUNTERS
        # the compiled program's arguments: the state shard and the batch shard (1 of 8 rows, 5 [B, S] fields)
        state = row["param_bytes"] + row["opt_state_bytes"] + row["other_state_bytes"]
        assert row["argument_bytes"] == state + 5 * (BATCH // 8) * SEQ * 4
        assert row["peak_bytes"] == (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                                     - row["alias_bytes"])
        assert row["alias_bytes"] >= state - 16  # the donated state is updated in place
        tokens = BATCH * SEQ
        assert row["model_flops_6nt_total"] == 6 * payload["meta"]["active_params"] * tokens
        assert row["xla_flops_total"] == row["xla_flops_per_device"] * 8
    # the same global work, split 8 ways either way (XLA's count of the per-device program)
    assert fsdp["dot_flops_per_device"] == pytest.approx(data["dot_flops_per_device"], rel=0.05)


def test_cli_collectives(cli_run):
    _, _, _, payload, _ = cli_run
    data, fsdp = payload["rows"]
    full_params = param_elements(1) * F32
    c = data["collectives"]
    assert c["all-gather"]["executed"] == 0                      # nothing sharded to gather
    # the gradient all-reduce: every parameter's gradient once (+ a few metric scalars)
    assert full_params <= c["all-reduce"]["bytes"] + c["reduce-scatter"]["bytes"] <= 1.01 * full_params
    c = fsdp["collectives"]
    sharded_part = (param_elements(1, 8) - replicated_elements(1)) * F32
    assert c["all-gather"]["executed"] > 0
    assert c["all-gather"]["bytes"] >= sharded_part              # every D-split weight gathered at least once
    assert c["all-gather"]["traffic"] == 7 * c["all-gather"]["bytes"]  # each shard sent to the 7 others
    # gradients are summed over the 8 devices at full size (all-reduce, or reduce-scatter on GPU / TPU)
    assert c["all-reduce"]["executed"] + c["reduce-scatter"]["executed"] > 0
    assert c["all-reduce"]["bytes"] + c["reduce-scatter"]["bytes"] >= full_params


def test_cli_outputs_one_row_per_layout(cli_run):
    _, stdout, markdown, payload, directory = cli_run
    fields = {"layout", "mesh", "devices", "batch_size", "seq_len", "grad_accum_steps", "param_bytes",
              "opt_state_bytes", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
              "generated_code_bytes", "peak_bytes", "fits", "xla_flops_per_device", "xla_flops_total",
              "dot_flops_per_device", "model_flops_6nt_total", "collectives", "compile_seconds"}
    assert len(payload["rows"]) == 2
    for row in payload["rows"]:
        assert fields <= set(row)
        assert set(row["fits"]) == {"H100 80 GB", "TPU v5p 95 GB"}
        assert set(row["collectives"]) == set(plan.COLLECTIVES)
    meta = payload["meta"]
    assert (meta["devices"], meta["batch_size"], meta["seq_len"]) == (8, BATCH, SEQ)
    assert meta["total_params"] == param_elements(1)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| data=8 |") and table[2].startswith("| fsdp=8 |")
    text_rows = [line for line in stdout.splitlines() if re.match(r"^(data|fsdp)=8\s", line)]
    assert len(text_rows) == 2
    assert sorted(os.listdir(directory)) == ["tiny.json", "tiny.md"]  # no temporary files left behind


def test_per_shard_batch_sets_the_accumulation():
    p = tiny_plan(1).with_batch(64, 1)
    laid = plan.layout_batch(p, "fsdp=8", 8, 2, fixed_batch=True)   # 64 = 4 micro-batches of 2 x 8
    assert (laid.batch_size, laid.grad_accum_steps, laid.micro_batch) == (64, 4, 16)
    laid = plan.layout_batch(tiny_plan(1), "fsdp=8", 8, 2, fixed_batch=False)
    assert (laid.batch_size, laid.grad_accum_steps) == (16, 1)
    with pytest.raises(ValueError, match=r"--batch_size=64 is not divisible by --per_shard_batch=3"):
        plan.layout_batch(p, "fsdp=8", 8, 3, fixed_batch=True)


def test_parse_layouts_and_hbm():
    assert plan.parse_layouts(["fsdp=16,expert=4;model=8", "data=2,fsdp=4"]) == [
        ("fsdp=16,expert=4", {"data": -1, "fsdp": 16, "expert": 4, "model": 1}),
        ("model=8", {"data": -1, "fsdp": 1, "expert": 1, "model": 8}),
        ("data=2,fsdp=4", {"data": 2, "fsdp": 4, "expert": 1, "model": 1})]
    assert plan.parse_hbm("80,95,141") == [(80.0, "H100 80 GB"), (95.0, "TPU v5p 95 GB"), (141.0, "H200 141 GB")]
    assert plan.fit(0.9 * 80 * 2 ** 30, 80) == "yes" and plan.fit(0.95 * 80 * 2 ** 30, 80) == "tight"
    assert plan.fit(81 * 2 ** 30, 80) == "no"


def test_configure_fake_devices_replaces_the_count(monkeypatch):
    monkeypatch.setattr(plan, "_backends_initialised", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8 --xla_bar")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's (running) backend alone
    assert plan.configure_fake_devices(128)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_bar",
                                               "--xla_force_host_platform_device_count=128"]


# ------------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("args, words", [
    (["--mesh=fsdp=8,foo=2"], ["--mesh 'fsdp=8,foo=2'", "unknown axis 'foo'"]),
    (["--mesh=fsdp=3"], ["--mesh 'fsdp=3'", "mesh.data=-1 cannot be filled", "8 devices"]),
    (["--mesh=data=1,fsdp=16"], ["--mesh 'data=1,fsdp=16'", "larger than the 8 devices"]),
    (["--mesh=fsdp=8", "--config.model.d_model=36"], ["--mesh 'fsdp=8'", "model.d_model=36", "mesh.fsdp=8"]),
    (["--mesh=data=8", "--batch_size=4"], ["--mesh 'data=8'", "train.batch_size=4 is not divisible by the 8 data"]),
    (["--mesh=data=8", "--devices=16"], ["--devices=16", "more than the 8"]),
    (["--mesh=data=8", "--hbm=80,lots"], ["--hbm", "'lots' is not a number"]),
])
def test_bad_layouts_fail_in_one_line(capsys, args, words):
    argv = ["plan", f"--config={TINY}", "--devices=8", f"--batch_size={BATCH}", f"--seq_len={SEQ}"] + args
    if any(a.startswith("--devices=") for a in args):
        argv.remove("--devices=8")
    assert plan.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_state_bytes_uses_the_shard_shape():
    """Uneven cases are replicated by the rules; an explicit sharding's shard shape is what is counted."""
    mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
    tree = {"w": jax.ShapeDtypeStruct((8, 12), jnp.bfloat16), "s": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = {"w": NamedSharding(mesh, P("b", "a")), "s": NamedSharding(mesh, P())}
    assert plan.sharded_bytes(tree, shardings) == 2 * 6 * 2 + 4
    assert np.prod(shardings["w"].shard_shape((8, 12))) == 12
