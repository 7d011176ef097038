"""Mixed precision: float32 master weights (param_dtype), bfloat16 matmuls (dtype) and residual stream
(activation_dtype), with the routers, the softmaxes, the norms' statistics, the aux losses and the cross-entropy in
float32 (models/config.py ModelConfig's promise), for every FFN kind (moe with the sparsemixer_v2 and the
topk_softmax routers, ds_moe, dense, peer) and for the attention experts (model.moa).

The dtype checks read the jaxpr of the gradient of the training loss (forward and backward, nested jaxprs
included) and attribute each op to the innermost grin_jax function that traced it:
  - every op of a softmax / log-softmax / logsumexp / entropy, a norm's statistics or a top-k
    (exp, log, log1p, logistic, reduce_max, rsqrt, argmax, top_k) takes float32, except inside the experts'
    activations (jax.nn.gelu / silu), which run in the compute dtype by design;
  - every matmul (dot_general) has bfloat16 operands, except the routers' (float32 x float32 at precision HIGHEST,
    in the functions listed in ROUTER_MATMULS), the backward of the attention scores (their float32 cotangent
    times the bfloat16 keys / queries, as in jax.nn.dot_product_attention's XLA implementation) and the backward of
    the LM head (the float32 logits' cotangent times bfloat16); the attention scores q.k and the logits leave their
    bfloat16 matmuls in float32.
"""

import math
import os
import sys
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.extend import core as jex_core

import grin_jax
from grin_jax import models
from grin_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

from kind_checks import smoke_config, train_losses  # noqa: E402

MIXED = dict(param_dtype="float32", dtype="bfloat16", activation_dtype="bfloat16")
FLOAT32 = dict(param_dtype="float32", dtype="float32", activation_dtype="float32")
BACKBONE = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=16, attention_bias=True,
                lm_head_bias=True)
MOE = dict(kind="moe", num_experts=4, top_k=2, d_hidden=16, input_jitter=0.01, load_balance_coef=0.01,
           z_loss_coef=0.001)
# Tiny models, each FFN kind in a layer of its own (section name = the kind's name in the tests). The kinds with
# discrete routing decisions (top-k, SparseMixer's samples, PEER's product-key top-k) have a model of one layer each:
# stacked, a decision that flips on a near tie under the bfloat16 rounding of an earlier layer changes everything
# downstream (one flipped token-slot in the second of two MoE layers brings the gradients' cosine to ~0.97). DS-MoE,
# the dense FFN and the attention experts (model.moa) train densely (softmax-weighted, no top-k) and share one.
MODELS = {
    "moe_sparsemixer": dict(num_layers=1, layout="moe_sparsemixer",
                            moe_sparsemixer=dict(MOE, router="sparsemixer_v2", router_options={"jitter_eps": 0.3})),
    "moe_topk": dict(num_layers=1, layout="moe_topk", moe_topk=dict(MOE, router="topk_softmax")),
    "peer": dict(num_layers=1, layout="peer", peer=dict(num_experts=64, heads=2, top_k=4, d_key=16)),
    "ds_moe_dense_moa": dict(num_layers=2, layout="ds_moe,dense", ds_moe=dict(num_experts=4, d_hidden=16, mi_coef=0.01),
                             dense=dict(d_hidden=64), moa=dict(num_experts=2, mi_coef=0.01)),
}
# The float32 softmaxes each model must have (the innermost grin_jax function of a float32 `exp`), besides the
# attention's and the cross-entropy's: its routers'.
SOFTMAXES = {
    "moe_sparsemixer": {"moe/sparsemixer.py:sparsemixer_v2", "moe/routing.py:sparsemixer_v2_router",
                        "moe/losses.py:router_z_loss"},
    "moe_topk": {"moe/routing.py:topk_softmax_router", "moe/losses.py:router_z_loss"},
    "peer": {"ffn/peer.py:PEERFFN.route"},
    "ds_moe_dense_moa": {"ffn/ds_moe.py:DSMoEFFN.scores", "nn/moa.py:MixtureOfAttention.scores"},
}
ROUTER_MATMULS = {"moe/layer.py:_body", "ffn/ds_moe.py:DSMoEFFN.scores", "nn/moa.py:MixtureOfAttention.scores",
                  "ffn/peer.py:query_moments", "ffn/peer.py:_project", "ffn/peer.py:_half_scores"}
ATTENTION_SCORES = "nn/attention.py:dot_product_attention"
LM_HEAD = "nn/layers.py:Dense.__call__"  # the untied head: bfloat16 operands, float32 logits (out_dtype)
FLOAT32_OPS = ("exp", "log", "log1p", "logistic", "reduce_max", "rsqrt", "argmax", "top_k")
ACTIVATIONS = {"gelu", "silu"}  # jax.nn functions: the experts' activations (compute dtype by design)
PACKAGE = os.path.dirname(os.path.abspath(grin_jax.__file__)) + os.sep  # frames in the package imported
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, BACKBONE["vocab_size"])


# ------------------------------------------------------------------------------------------------ the jaxpr
def _frames(eqn):
    traceback = eqn.source_info.traceback
    return [] if traceback is None else list(traceback.frames)


def _where(frames):
    """The innermost grin_jax function among the frames ('moe/layer.py:_body'), or None."""
    for frame in frames:  # innermost first
        if frame.file_name.startswith(PACKAGE):
            return f"{frame.file_name[len(PACKAGE):]}:{frame.function_name}"
    return None


def _walk(jaxpr, outer_where=None, outer_names=frozenset()):
    """(eqn, where, names) for every eqn, nested jaxprs included (jit, custom_jvp / vjp, checkpoint, scan, ...).
    An eqn inside a nested jaxpr (e.g. the body of jax.nn.log_softmax) has no grin_jax frame of its own: it takes
    its enclosing eqn's `where`. names: every function name on the way (frames and nested jaxprs' names)."""
    for eqn in jaxpr.eqns:
        frames = _frames(eqn)
        where = _where(frames) or outer_where
        names = outer_names | {f.function_name for f in frames} | {str(eqn.params.get("name", ""))}
        yield eqn, where, names
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _walk(sub.jaxpr, where, names)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _walk(sub, where, names)


def _has_float32_logits(eqn) -> bool:
    """A backward product of the LM head: its float32 operand is the logits' cotangent [..., vocab]."""
    return any(v.aval.dtype == jnp.float32 and v.aval.shape[-1] == BACKBONE["vocab_size"] for v in eqn.invars)


def _dtypes(eqn):
    return tuple(jnp.dtype(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))


# ------------------------------------------------------------------------------------------------ the models
def _config(model, dtypes):
    return models.ModelConfig.make(**BACKBONE, **MODELS[model], **dtypes)


def _loss_fn(graphdef):
    def loss(params):
        logits, aux = models.apply(graphdef, params, TOKENS, training=True, rng=jax.random.key(2))
        return models.cross_entropy(logits[:, :-1], TOKENS[:, 1:]) + aux["aux_loss"], (logits, aux)
    return jax.value_and_grad(loss, has_aux=True)


@lru_cache(maxsize=None)
def _run(model, precision):
    """(params, jaxpr of the loss and its gradient, (loss, (logits, aux)), grads) of the model in `precision`
    ('mixed' | 'float32'), from the same float32 parameters."""
    graphdef, params = models.init(_config(model, MIXED if precision == "mixed" else FLOAT32), 0)
    traced = jax.jit(_loss_fn(graphdef)).trace(params)
    # LLVM optimisation level 0: the same numbers, half the compile time (the test file's budget)
    (loss, (logits, aux)), grads = traced.lower().compile({"xla_backend_optimization_level": 0})(params)
    return params, traced.jaxpr.jaxpr, (loss, (logits, aux)), grads


@pytest.mark.parametrize("model", sorted(MODELS))
def test_softmaxes_norms_and_top_k_run_in_float32(model):
    """Every softmax-like op (exp, log, logistic, reduce_max), norm statistic (rsqrt) and top-k / argmax in the
    forward and backward is float32 (but the experts' own activations); every router's softmax is among them."""
    _, jaxpr, _, _ = _run(model, "mixed")
    wrong, softmaxes = [], set()
    for eqn, where, names in _walk(jaxpr):
        name = eqn.primitive.name
        if name not in FLOAT32_OPS:
            continue
        if all(d == jnp.float32 for d in _dtypes(eqn)):
            if name == "exp":
                softmaxes.add(where)
        elif not names & ACTIVATIONS:
            wrong.append(f"{name}{tuple(d.name for d in _dtypes(eqn))} at {where}")
    assert not wrong, f"not float32: {sorted(set(wrong))}"
    assert softmaxes >= SOFTMAXES[model] | {ATTENTION_SCORES, "models/lm.py:cross_entropy"}, softmaxes


@pytest.mark.parametrize("model", sorted(MODELS))
def test_matmuls_run_in_bfloat16_but_the_routers(model):
    """Every dot_general has bfloat16 operands, except the routers' float32 matmuls (which must ask for precision
    HIGHEST: a float32 matmul's default is one bfloat16 pass on TPU and TF32 on GPUs) and the attention scores'
    backward (float32 cotangent x bfloat16)."""
    _, jaxpr, _, _ = _run(model, "mixed")
    counts = {"bfloat16": 0, "router": 0, "scores": 0, "logits": 0}
    wrong = []
    for eqn, where, _ in _walk(jaxpr):
        if eqn.primitive.name != "dot_general":
            continue
        dtypes = _dtypes(eqn)
        if all(d == jnp.bfloat16 for d in dtypes):
            counts["bfloat16"] += 1
            # the attention logits q.k leave their matmul in float32 (not rounded to bfloat16 before the softmax)
            counts["scores"] += where == ATTENTION_SCORES and eqn.outvars[0].aval.dtype == jnp.float32
            counts["logits"] += (where == LM_HEAD and eqn.outvars[0].aval.dtype == jnp.float32
                                 and eqn.outvars[0].aval.shape[-1] == BACKBONE["vocab_size"])
        elif all(d == jnp.float32 for d in dtypes) and where in ROUTER_MATMULS:
            counts["router"] += 1
            if eqn.params["precision"] != (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST):
                wrong.append(f"router matmul at {where} with precision {eqn.params['precision']}")
        elif set(dtypes) == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)} and (
                where == ATTENTION_SCORES or (where == LM_HEAD and _has_float32_logits(eqn))):
            pass
        else:
            wrong.append(f"dot_general{tuple(d.name for d in dtypes)} at {where}")
    assert not wrong, sorted(set(wrong))
    # q, k, v, o, the LM head (forward and the two products of the backward each) and the FFN's matmuls
    assert counts["bfloat16"] >= 15, counts
    assert counts["router"] > 0, counts
    assert counts["scores"] >= 1 and counts["logits"] == 1, counts


@pytest.mark.parametrize("model", sorted(MODELS))
def test_parameters_gradients_and_outputs_are_float32(model):
    params, _, (loss, (logits, aux)), grads = _run(model, "mixed")
    for tree, what in ((params, "parameter"), (grads, "gradient")):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            assert leaf.dtype == jnp.float32, f"{what} {jax.tree_util.keystr(path)} is {leaf.dtype}"
    assert loss.dtype == logits.dtype == aux["aux_loss"].dtype == jnp.float32
    floats = {k: v.dtype for group in ("losses", "metrics", "sums") for k, v in aux[group].items()
              if jnp.issubdtype(v.dtype, jnp.floating)}
    assert floats and all(d == jnp.float32 for d in floats.values()), floats


@pytest.mark.parametrize("model", sorted(MODELS))
def test_loss_and_gradients_close_to_float32(model):
    """Same parameters, batch and training noise. bfloat16 keeps 8 significant bits: each rounding moves a value by up
    to 2^-8 ~ 0.4 %, and errors of that order per op, partly averaging out, bound the loss's relative error well
    under 2e-2 and keep the cosine of the flattened gradients (all of them, and each layer's, i.e. each FFN kind's)
    above 0.99."""
    _, _, (loss_mixed, _), grads_mixed = _run(model, "mixed")
    _, _, (loss_full, _), grads_full = _run(model, "float32")
    assert math.isfinite(float(loss_mixed))
    assert abs(float(loss_mixed) / float(loss_full) - 1) < 2e-2, (float(loss_mixed), float(loss_full))

    def flat(grads, prefix):
        return np.concatenate([np.ravel(np.asarray(g, np.float64)) for path, g in
                               jax.tree_util.tree_leaves_with_path(grads)
                               if jax.tree_util.keystr(path).startswith(prefix)])

    layout = _config(model, MIXED).layout
    cosines = {}
    for name, prefix in [("all", "")] + [(f"layer {i} ({kind})", f"['layers'][{i}]") for i, kind in enumerate(layout)]:
        a, b = flat(grads_mixed, prefix), flat(grads_full, prefix)
        assert np.all(np.isfinite(a)), name
        cosines[name] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert min(cosines.values()) > 0.99, cosines


def test_training_run_keeps_float32_master_weights_and_optimizer_state(tmp_path):
    """configs/grin_tiny.py:smoke (one layer, 8 steps at a higher learning rate) in mixed precision: the loss goes
    well down and the checkpoint on disk holds float32 parameters and float32 AdamW moments."""
    config = smoke_config(steps=8, learning_rate=1e-2, eval_every=0, checkpoint_every=0, final_eval_batches=1)
    config.model.update(MIXED)
    config.model.num_layers = 1  # compile time
    workdir = str(tmp_path / "mixed")
    summary = trainer.train(config, workdir)
    losses = train_losses(workdir)
    steps = config.train.steps
    assert summary["steps"] == steps and sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    # from about ln(259) = 5.56 (uniform over the byte vocabulary) to ~3.7 (float32 and mixed alike)
    assert losses[steps] < losses[1] - 1.0, losses
    assert summary["validation_loss"] < math.log(259) - 1.0, summary["validation_loss"]
    saved = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(steps), "state"))
    saved = getattr(saved, "item_metadata", saved)
    dtypes = {jax.tree_util.keystr(path): jnp.dtype(leaf.dtype)
              for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    params = {k: d for k, d in dtypes.items() if k.startswith("['params']")}
    moments = {k: d for k, d in dtypes.items() if "['mu']" in k or "['nu']" in k}
    assert params and len(moments) == 2 * len(params), (len(params), len(moments))
    wrong = {k: d.name for k, d in {**params, **moments}.items() if d != jnp.float32}
    assert not wrong, wrong


def test_grin_moe_config_variants():
    import grin_moe_16x3_8b

    dtypes = lambda arg: {k: grin_moe_16x3_8b.get_config(arg).model[k]  # noqa: E731
                          for k in ("param_dtype", "dtype", "activation_dtype")}
    assert dtypes("") == FLOAT32
    assert dtypes("mixed") == MIXED == dtypes("topk,mixed")
    assert dtypes("bf16") == dict.fromkeys(FLOAT32, "bfloat16")
    assert models.model_config_from(grin_moe_16x3_8b.get_config("mixed").model).dtype == "bfloat16"
    with pytest.raises(ValueError, match="accepted values are dense, bf16, mixed, topk"):
        grin_moe_16x3_8b.get_config("fp8")
    with pytest.raises(ValueError, match="bf16 and mixed exclude each other"):
        grin_moe_16x3_8b.get_config("bf16,mixed")
