"""Fine-grained MoE (Krajewski et al., docs/fine_grained.md): the parametrisation, its validation, expert-choice routing
and the MoE output norm in the model, and the paper's FLOP formula against XLA's count."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax import models, params as _params
from grin_jax.models import ModelConfig
from grin_jax.moe import layer as _layer
from grin_jax.scaling import flops as _flops
from grin_jax.scaling.summary import paper_flops_per_token
from grin_jax.train import optim as _optim
from grin_jax.train import trainer as _trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A paper-style block: full multi-head attention without biases (4 d^2), plain 2-matrix GELU experts.
PAPER = dict(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64,
             attention_bias=False)
PAPER_MOE = dict(activation="gelu", expansion_rate=8.0, router="expert_choice", router_options={"capacity_factor": 1.0})


def paper(moe=None, **backbone) -> ModelConfig:
    """The paper-style model with `moe` changes to its MoE section and `backbone` changes."""
    return ModelConfig.make(**{**PAPER, **backbone}, layout="moe", moe={**PAPER_MOE, **(moe or {})})


# ------------------------------------------------------------------------------------------ parametrisation
@pytest.mark.parametrize("granularity", [1, 2, 4, 8])
def test_fine_grained_fields_derive_experts_width_and_top_k(granularity):
    moe = paper(moe=dict(granularity=granularity)).section("moe")
    assert moe.num_experts == 8 * granularity
    assert moe.d_hidden == 4 * 64 // granularity
    assert moe.top_k == granularity
    assert moe.top_k * moe.d_hidden == 4 * 64  # the dense FFN the experts are cut from
    ref = _flops.fine_grained(64, 8, granularity)  # the scaling module's helper agrees
    assert (ref.num_experts, ref.expert_width, ref.top_k) == (moe.num_experts, moe.d_hidden, moe.top_k)
    assert moe.router == "expert_choice"


def test_explicit_d_ff_and_fractional_expansion():
    with pytest.raises(ValueError, match=r"moe\.top_k"):  # E < 1: G slots but only E*G < G experts
        paper(moe=dict(expansion_rate=0.5, granularity=4, d_ff=128))
    c = paper(moe=dict(expansion_rate=2, granularity=4, d_ff=128)).section("moe")
    assert (c.num_experts, c.d_hidden, c.top_k) == (8, 32, 4)


def test_active_params_do_not_depend_on_granularity_and_n_matches_the_paper():
    """N (the law) = d^2 (8E + 4) per block: the experts (8 E d^2) plus attention (4 d^2) exactly; our
    non-embedding count adds only the router (d E G per block) and the norms."""
    d, L, E = PAPER["d_model"], PAPER["num_layers"], PAPER_MOE["expansion_rate"]
    active = set()
    for granularity in (1, 2, 4, 8):
        c = paper(moe=dict(granularity=granularity, output_norm=True))
        n = _params.count_params(c)
        assert n["experts"] + n["attention"] == d * d * (8 * E + 4) * L == _flops.param_count(d, L, E)
        assert n["router"] == d * E * granularity * L == _flops.router_param_count(d, L, E, granularity)
        assert n["non_embedding"] == n["experts"] + n["attention"] + n["router"] + n["norms"]
        assert n["norms"] == (2 * 2 * L + 2 * L + 2) * d  # 2 LayerNorms + the MoE output norm per block, final
        assert n["experts_active"] == 8 * d * d * L  # G experts of width 4d/G: 8 d^2 per block
        assert n["experts_active"] + n["attention_active"] == _flops.active_param_count(d, L)
        active.add(n["active_non_embedding"] - n["router"])
    assert len(active) == 1


def test_dense_baseline_of_a_fine_grained_config():
    c = paper(moe=dict(granularity=4)).replace(layout="dense", dense={"activation": "gelu"})
    n = _params.count_params(c)
    assert c.section("dense").d_hidden == 256 and n["dense_ffn"] == 8 * 64 * 64 * 2


def test_round_trip_and_replace_rederive():
    c = paper(moe=dict(granularity=2))
    assert ModelConfig.from_dict(c.to_dict()) == c
    c8 = c.replace(moe={"granularity": 8}).section("moe")
    assert (c8.num_experts, c8.d_hidden, c8.top_k) == (64, 32, 8)
    wide = c.replace(d_model=128).section("moe")
    assert (wide.num_experts, wide.d_hidden, wide.top_k) == (16, 256, 2)
    plain = ModelConfig.make(**PAPER, layout="moe", moe={}).section("moe")
    assert (plain.num_experts, plain.top_k, plain.d_hidden, plain.granularity) == (16, 2, 1024, 1)
    # an explicit value equal to the derived one is accepted
    assert paper(moe=dict(granularity=2, num_experts=16)).section("moe") == c.section("moe")


@pytest.mark.parametrize("changes, field", [
    (dict(granularity=3), "granularity"),                      # 3 does not divide d_ff = 256
    (dict(granularity=4, d_ff=102), "granularity"),             # 4 does not divide 102
    (dict(granularity=2, num_experts=8), "num_experts"),         # derived: 16
    (dict(granularity=2, top_k=1), "top_k"),                     # derived: 2
    (dict(granularity=2, d_hidden=256), "d_hidden"),            # derived: 128
    (dict(granularity=0), "granularity"),
    (dict(granularity=4, expansion_rate=0.1), "expansion_rate"),  # 0.4 experts
    (dict(expansion_rate=-1.0), "expansion_rate"),
    (dict(expansion_rate=None, granularity=2), "granularity"),  # G without E
    (dict(router="expert_chioce"), "router"),
    (dict(output_norm="yes"), "output_norm"),
    (dict(expansion_rate=float("inf")), "expansion_rate"),
    (dict(router_options={"capacity_factor": float("nan")}), "router_options.capacity_factor"),
])
def test_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b(moe|router_options)\.{field.split('.')[-1]}="):
        paper(moe=changes)


def test_router_name_accepted_by_moe_config_and_rejected_by_the_token_layer():
    cfg = _layer.MoEConfig(num_experts=4, top_k=2, d_model=8, d_hidden=8, router="expert_choice")
    with pytest.raises(ValueError, match="expert_choice"):
        _layer.MoEConfig(num_experts=4, top_k=2, d_model=8, d_hidden=8, router="nope")
    params = _layer.init_moe_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"\[batch, seq, d_model\]"):
        _layer.moe_layer(params, jnp.ones((4, 8)), config=cfg, training=False)
    # the token-choice routers are untouched
    _layer.MoEConfig(num_experts=4, top_k=2, d_model=8, d_hidden=8, router="topk_softmax")


def test_config_files():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import fine_grained_tiny
        for variant in ("", "smoke", "dense", "topk", "dense+smoke"):
            config = fine_grained_tiny.get_config(variant)
            c = models.model_config_from(config.model)
            moe = c.section("moe")
            assert moe.expansion_rate == 8.0 and moe.activation == "gelu"
            assert moe.router == ("topk_softmax" if "topk" in variant else "expert_choice")
            assert set(c.layout) == ({"dense"} if "dense" in variant else {"moe"})
        with pytest.raises(ValueError, match="variant"):
            fine_grained_tiny.get_config("huge")
    finally:
        sys.path.remove(os.path.join(REPO, "configs"))
    from grin_jax import sweep as _sweep
    import ml_collections  # noqa: F401
    from ml_collections import config_flags  # noqa: F401
    import importlib.util
    spec = importlib.util.spec_from_file_location("granularity_sweep", os.path.join(REPO, "configs", "sweeps",
                                                                                   "granularity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trials = _sweep.expand_trials(module.get_config())
    assert len(trials) == 45  # 3 seeds x 3 sizes x 5 variants
    assert trials[0]["train.seed"] == 0 and trials[-1]["train.seed"] == 2  # seed outermost
    assert {(t["model.layout"], t["model.moe.granularity"]) for t in trials} == {
        ("moe", 1), ("moe", 2), ("moe", 4), ("moe", 8), ("dense", 1)}


# ------------------------------------------------------------------------------------------ in the model
def test_expert_choice_train_step_with_output_norm():
    """Two optimizer steps of a G = 4 expert-choice model with the MoE output norm: finite loss and gradients,
    the router and the output norm receive gradient, the params change."""
    c = paper(moe=dict(granularity=4, output_norm=True), num_layers=1, d_model=32, max_seq_len=16)
    graphdef, params = models.init(c, rng=0)
    names = _params_names(params)
    assert "layers.0.mlp.output_norm.scale" in names and "layers.0.mlp.output_norm.bias" in names
    assert "layers.0.mlp.w_gate" not in names  # plain GELU experts: two matrices
    tx, _ = _optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=2, weight_decay=0.0, b1=0.9,
                                  b2=0.95, clip_norm=1.0, final_lr_fraction=1.0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(1)}
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, 259)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones((8, 16))}
    step = jax.jit(_trainer.make_train_step(graphdef, tx))
    new_state, metrics = step(state, batch)  # the schedule's learning rate is 0 at step 0
    new_state, metrics = step(new_state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["grad_norm"]) > 0
    assert float(np.mean(metrics["moe/dropped_fraction"])) < 1.0
    from grin_jax.models.lm import flatten_params
    before, after = flatten_params(params), flatten_params(new_state["params"])
    for name in ("layers.0.mlp.router", "layers.0.mlp.output_norm.scale", "layers.0.mlp.w_up"):
        assert np.all(np.isfinite(np.asarray(after[name])))
        assert not np.allclose(np.asarray(before[name]), np.asarray(after[name])), name


def _params_names(params):
    from grin_jax.models.lm import flatten_params
    return set(flatten_params(params))


# ------------------------------------------------------------------------------------------ FLOPs
def _xla_flops_per_token(c: ModelConfig, batch: int, seq: int) -> float:
    graphdef, params = models.abstract_init(c)

    def loss(p, tokens):
        logits, aux = models.apply(graphdef, p, tokens, training=True, rng=jax.random.key(0))
        return models.cross_entropy(logits, tokens, jnp.ones(tokens.shape, jnp.float32)) + aux["aux_loss"]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(
        params, jax.ShapeDtypeStruct((batch, seq), jnp.int32)).compile()
    return _trainer.compiled_flops(compiled) / (batch * seq)


def test_paper_flops_against_xla(monkeypatch):
    """The paper's FLOPs per token (c_f = 6 per active non-embedding parameter, c_r = 14 per router parameter;
    scaling.summary.paper_flops_per_token) against XLA's cost analysis of the compiled forward + backward (no optimizer).

    Configs where XLA counts only active expert FLOPs: expert choice and the capacity backend, both at
    capacity_factor 1 (every expert processes exactly T*G/(E*G) token rows: no padding), ReLU experts so the
    element-wise cost is small; d_model 64, 1 block, E = 8, batch 16 x seq 16, vocab 259, no MoE output norm.
    XLA counts 2 FLOPs per multiply-add and 3 matmuls per weight (forward, input- and weight-gradient), i.e. 6 per
    parameter per token, so it should equal
        paper - 8 * router            (XLA counts the router matmul, 6/param, not the paper's 8 for routing:
                                       top-k, gathers and scatters are not FLOPs to XLA)
        + 6 * d_model * vocab         (the LM head: not in the paper's non-embedding count)
        + 12 * seq * d_model * blocks (attention scores QK^T and AV: 2 * 2 * S * d forward per token, x 3; the
                                       causal mask does not halve it, the full S x S is computed)
    plus element-wise work (LayerNorms, softmaxes over keys, experts and vocab, RoPE, ReLU, residual adds,
    the loss), which grows with d, not d^2. Measured (jax 0.10.2, CPU; FLOPs per token):
        expert choice G=1:  XLA 425,331  paper 304,384  expected 412,032  XLA/expected 1.032  XLA/paper 1.40
        expert choice G=4:  XLA 436,611  paper 325,888  expected 421,248  XLA/expected 1.036  XLA/paper 1.34
        top-k capacity G=2: XLA 430,416  paper 311,552  expected 415,104  XLA/expected 1.037  XLA/paper 1.38
        (dense, same width:  XLA 421,685  paper 297,216  expected 408,960  XLA/expected 1.031)
    so the residual is 3-4 % (~13k element-wise FLOPs per token, the same with and without experts), inside the
    0-8 % margin asserted; the paper formula alone is 25-30 % below XLA at this toy size, almost all of it the LM
    head (99k per token against 72 d^2 = 295k for the block) and the attention scores (12k), which the paper's
    formula leaves out (negligible at its scale, not at ours: see experiments/granularity/README.md).
    With exact-GELU experts (the sweep's) the residual is ~9-10 % (2 blocks: XLA/expected 1.094 dense, 1.097-1.100
    expert choice): XLA expands erf into a polynomial of element-wise ops on the 4d-wide hidden layer.
    Granularity: XLA(G=4) - XLA(G=1) = 11,280 per token: between the router matmul alone (6 * d * E * 3 = 9,216)
    and the paper's c_r = 14 (21,504): XLA sees the router's softmax / top-k elementwise work, not the routing
    data movement the paper's extra 8 FLOPs stand for.
    """
    # XLA's attention (the CPU attention kernel is a custom call, whose FLOPs XLA's cost analysis cannot see)
    monkeypatch.setenv("GRIN_JAX_KERNEL", "0")
    base = {"num_layers": 1, "max_seq_len": 16}
    batch, seq = 16, 16
    d, L, V = PAPER["d_model"], base["num_layers"], PAPER["vocab_size"]
    results = {}
    for name, changes in [("ec1", dict(granularity=1)), ("ec4", dict(granularity=4)),
                          ("cap2", dict(granularity=2, router="topk_softmax", backend="capacity", capacity_factor=1.0,
                                        router_options={"renormalize": False}))]:
        c = paper(moe={"activation": "relu", **changes}, **base)
        counts = _params.count_params(c)
        paper_flops = paper_flops_per_token(c, counts)
        # the paper formula in the scaling module agrees (active 12 d^2 per block and the router d E G)
        # (+ 6 per norm parameter: counted as active non-embedding parameters)
        assert paper_flops == pytest.approx(_flops.flops_per_token(d, L, 8, c.section("moe").granularity)
                                            + 6 * counts["norms"])
        expected = paper_flops - 8 * counts["router"] + 6 * d * V + 12 * seq * d * L
        xla = _xla_flops_per_token(c, batch, seq)
        results[name] = xla
        assert 1.0 <= xla / expected <= 1.08, (name, xla, expected, paper_flops)
        assert xla / paper_flops > 1.2  # the LM head and attention scores are real at this size
    delta_router = 6 * d * 8 * (4 - 1) * L
    assert delta_router <= results["ec4"] - results["ec1"] <= 14 / 6 * delta_router
