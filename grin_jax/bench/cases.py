"""The benchmark cases. Axes: T tokens, D model, E experts, K slots per token, F expert width, G granularity.

Shapes (full size; `--quick` shrinks every number, see `Sizes`):
  dense baseline   a SwiGLU FFN, D = 512, width 2048 (= K * F of every MoE below: same active FLOPs), T = 8192.
  granularity G    Krajewski et al.'s granularity at fixed active AND total parameters: E = 8G experts of width
                   F = 1024 / G, top-K = 2G.  G = 1 is the coarse case (E=8, top-2, width 1024), G = 8 the
                   fine-grained one (E=64, top-16, width 128); G = 2, 4, 16 fill in the curve.
  loads            routing is built directly (no router), so loads are controlled:
                   'balanced': slot (t, k) -> expert (t*K + k) mod E (every expert exactly T*K/E slots);
                   'skewed':   Zipf-like, expert popularity p_e ~ 1/(e+1)^1.2, K distinct experts per token by
                               Gumbel-top-k sampling (G=1: the busiest expert gets ~35 % of the slots, ~5x the
                               mean; records carry 'max_load_over_mean').
Useful FLOPs (active, what the dense baseline also does): forward 2 * T * K * F * D * 3 (gate, up, down);
forward + backward 3x that. A backend that computes more (dense reference: E/K x, ragged_dot on CPU: E x) still
gets credit for the useful FLOPs only, so its GFLOP/s shows the waste.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from grin_jax.bench.harness import Group, Variant
from grin_jax.moe import cpu_kernel, dispatch, experts, gmm, routing

ZIPF_ALPHA = 1.2
CAPACITY_FACTOR = 1.25
FWD, FWD_BWD = "fwd", "fwd+bwd"


@dataclasses.dataclass(frozen=True)
class Sizes:
    tokens: int = 8192
    d_model: int = 512
    base_experts: int = 8
    base_top_k: int = 2
    base_width: int = 1024        # expert width at G = 1; dense width = base_top_k * base_width
    granularities: tuple = (1, 2, 4, 8, 16)
    backend_tokens: tuple = ((1, 1024), (8, 256))  # (G, T) for the every-backend groups (dense ref / ragged_dot
    #                                                 compute E x the useful FLOPs on CPU: reduced T)
    router_shapes: tuple = ((8, 2), (64, 16))
    loads: tuple = ("skewed", "balanced")
    ablation: bool = True         # also time the unfused sort + gmm.tiled_gmm path
    auto_variant: bool = True     # also time backend='auto' (compiles the same program as the platform's backend)
    peak_n: int = 4096
    train_step: bool = True
    train_variant: str = ""       # configs/grin_tiny.py variant for the train-step case
    train_seq_len: int = 256      # the train-step case's sequence length (issue 13's shape: 16 x 256 tokens)
    loop_steps: int = 10          # the main-job loop group: trainer steps per timed call
    peer_tokens: int = 4096       # the PEER layer against a GELU FFN of width 4 D (issue: h=4, k=8, d=128)
    peer_d_model: int = 128
    peer_heads: int = 4
    peer_top_k: int = 8
    peer_experts: tuple = (128 ** 2, 1024 ** 2)
    stream_n: int = 2 ** 25       # stream_triad: 3 x 128 MiB moved
    ds_tokens: int = 8192         # DS-MoE (ffn/ds_moe.py) at inference: the layer, top-K of N against every expert
    ds_d_model: int = 512
    ds_experts: int = 32          # d_hidden = 4 D / N: the experts parameter-matched to a dense FFN of width 4 D
    ds_top_ks: tuple = (8, 4, 1)  # top-K rows of the layer group; ds_top_k is the (>= 4x the dense mode)
    ds_top_k: int = 4
    ds_model_layers: int = 4      # and a whole DS-MoE LM's eval forward (logits), top-K ~30 % against the dense mode
    ds_model_heads: int = 8
    ds_model_vocab: int = 4096
    ds_model_shapes: tuple = ((8, 1024), (32, 256))  # (batch, seq), one group each: T = 8192 tokens
    ds_model_top_k: int = 10      # 10 / 32 = 31 % of the experts (issue: >= 1.5x the dense mode)
    ds_model_kv_heads: int = 2    # the LM's attention: DS-MoE's mixture of attention heads (nn/moa.py) over 2 KV heads
    ds_model_attention_experts: int = 4   # 4 experts of 2 query heads; the sparse rows run top-1 (25 %)


FULL = Sizes()
QUICK = Sizes(tokens=256, d_model=64, base_width=64, granularities=(), backend_tokens=((1, 64),),
              router_shapes=((8, 2),), loads=("skewed",), ablation=False, auto_variant=False, peak_n=256,
              train_step=False, train_variant="smoke", loop_steps=2, peer_tokens=256, peer_d_model=32,
              peer_experts=(16 ** 2, 32 ** 2), stream_n=2 ** 16, ds_tokens=256, ds_d_model=64, ds_experts=8,
              ds_top_ks=(2, 1), ds_top_k=2, ds_model_layers=2, ds_model_heads=4, ds_model_vocab=256,
              ds_model_shapes=((2, 64),), ds_model_top_k=3, ds_model_kv_heads=2, ds_model_attention_experts=2)


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int
    num_experts: int
    top_k: int
    d_expert: int
    granularity: int

    @property
    def dense_width(self) -> int:
        return self.top_k * self.d_expert

    def useful_flops(self, mode: str) -> float:
        fwd = 2.0 * self.tokens * self.top_k * self.d_expert * self.d_model * 3
        return fwd if mode == FWD else 3 * fwd

    def as_dict(self) -> dict:
        return {"T": self.tokens, "D": self.d_model, "E": self.num_experts, "K": self.top_k, "F": self.d_expert,
                "G": self.granularity, "dense_width": self.dense_width}


def granular_shape(sizes: Sizes, granularity: int, tokens: int | None = None) -> Shape:
    return Shape(tokens=tokens or sizes.tokens, d_model=sizes.d_model, num_experts=sizes.base_experts * granularity,
                 top_k=sizes.base_top_k * granularity, d_expert=sizes.base_width // granularity,
                 granularity=granularity)


# ------------------------------------------------------------------------------------------------ inputs
def skewed_ids(key, tokens: int, num_experts: int, top_k: int, alpha: float = ZIPF_ALPHA) -> jax.Array:
    """K distinct experts per token, sampled without replacement from p_e ~ 1/(e+1)^alpha (Gumbel-top-k)."""
    p = 1.0 / (np.arange(num_experts) + 1.0) ** alpha
    logp = jnp.asarray(np.log(p / p.sum()), jnp.float32)
    _, ids = jax.lax.top_k(logp + jax.random.gumbel(key, (tokens, num_experts)), top_k)
    return ids.astype(jnp.int32)


def balanced_ids(tokens: int, num_experts: int, top_k: int) -> jax.Array:
    """slot (t, k) -> (t*K + k) mod E: distinct per token, every expert exactly T*K/E slots when E | T*K."""
    return ((jnp.arange(tokens)[:, None] * top_k + jnp.arange(top_k)[None, :]) % num_experts).astype(jnp.int32)


def load_stats(ids) -> dict:
    counts = np.bincount(np.asarray(ids).ravel(), minlength=int(np.asarray(ids).max()) + 1)
    return {"max_load_over_mean": float(counts.max() / counts.mean())}


# ------------------------------------------------------------------------------------------------ functions
def dense_ffn(params, x_TD):
    """The dense baseline: SwiGLU FFN (w_gate, w_up: [D, W], w_down: [W, D])."""
    return (jax.nn.silu(x_TD @ params["w_gate"]) * (x_TD @ params["w_up"])) @ params["w_down"]


def moe_fn(backend: str):
    def f(params, x_TD, ids_TK, weights_TK):
        return dispatch.moe_ffn(params, x_TD, ids_TK, weights_TK, activation="swiglu", backend=backend,
                                capacity_factor=CAPACITY_FACTOR)[0]
    return f


def sorted_tiled_gmm(params, x_TD, ids_TK, weights_TK):
    """Ablation: the unfused dropless path (sort, gather [M, D], three grouped matmuls with `gmm.tiled_gmm`
    (w_gate/w_up as one), unsort, combine) - what 'tiled' was before the fused kernel."""
    num_tokens, top_k = ids_TK.shape
    order_M, sizes_E = dispatch.sort_by_expert(ids_TK, params["w_up"].shape[0])
    x_MD = jnp.take(x_TD, order_M // top_k, axis=0)
    y_MD = experts.apply_experts_grouped(params, x_MD, sizes_E, activation="swiglu", gmm=gmm.tiled_gmm)
    inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))
    y_TKD = jnp.take(y_MD, inverse_M, axis=0).reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK)


def with_mode(f, mode: str, argnums: tuple):
    """jit(f) for the forward; jit(grad of <f(...), cot>) w.r.t. `argnums` for forward + backward."""
    if mode == FWD:
        return jax.jit(lambda *args: f(*args[:-1]))  # last arg: the cotangent, unused

    def loss(*args):
        return jnp.vdot(f(*args[:-1]), args[-1])
    return jax.jit(jax.grad(loss, argnums=argnums))


def peak_variant(n: int, key) -> Variant:
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    return Variant("peak_matmul", jax.jit(jnp.matmul), (a, b), 2.0 * n ** 3,
                   meta={"case": "peak_matmul", "mode": "matmul", "backend": "xla", "load": "-",
                         "shape": {"M": n, "K": n, "N": n}})


def _moe_inputs(shape: Shape, key):
    k_x, k_p, k_d, k_w, k_ids, k_c = jax.random.split(key, 6)
    x = jax.random.normal(k_x, (shape.tokens, shape.d_model), jnp.float32)
    params = experts.init_expert_params(k_p, num_experts=shape.num_experts, d_model=shape.d_model,
                                        d_hidden=shape.d_expert, activation="swiglu")
    dense = experts.init_expert_params(k_d, num_experts=1, d_model=shape.d_model, d_hidden=shape.dense_width,
                                       activation="swiglu")
    dense = {k: v[0] for k, v in dense.items()}
    weights = jax.nn.softmax(jax.random.normal(k_w, (shape.tokens, shape.top_k)), axis=-1)
    ids = {"skewed": skewed_ids(k_ids, shape.tokens, shape.num_experts, shape.top_k),
           "balanced": balanced_ids(shape.tokens, shape.num_experts, shape.top_k)}
    cot = jax.random.normal(k_c, (shape.tokens, shape.d_model), jnp.float32)
    return x, params, dense, weights, ids, cot


def _ffn_variants(shape: Shape, key, moe_cases, *, slow_reps: int) -> list[Variant]:
    """dense_ffn baseline + the given MoE cases [(case, backend, fn, load, slow)], forward and forward+backward."""
    x, params, dense, weights, ids, cot = _moe_inputs(shape, key)
    out = []
    for mode in (FWD, FWD_BWD):
        base = f"dense_ffn/{mode}"
        meta = {"case": "dense_ffn", "mode": mode, "backend": "dense_ffn", "load": "-", "shape": shape.as_dict()}
        out.append(Variant(base, with_mode(dense_ffn, mode, (0, 1)), (dense, x, cot), shape.useful_flops(mode),
                           meta=meta))
        for case, backend, fn, load, slow in moe_cases:
            meta = {"case": case, "mode": mode, "backend": backend, "load": load, "shape": shape.as_dict(),
                    **load_stats(ids[load])}
            if backend == "auto":
                meta["resolves_to"] = dispatch.default_backend()
            if meta.get("resolves_to", backend) == "kernel":
                meta["scratch_bytes"] = cpu_kernel.scratch_bytes(shape.tokens, shape.top_k, shape.d_model,
                                                                 shape.d_expert)
            out.append(Variant(f"{case}/{backend}/{load}/{mode}", with_mode(fn, mode, (0, 1, 3)),
                               (params, x, ids[load], weights, cot), shape.useful_flops(mode), meta=meta,
                               baseline=base, reps=slow_reps if slow else None))
    return out


def granularity_groups(sizes: Sizes, key) -> list[Group]:
    groups = []
    for g in sizes.granularities:
        shape = granular_shape(sizes, g)
        cases = [("moe", backend, moe_fn(backend), load, False)
                 for backend in ("kernel", "tiled", "capacity") for load in sizes.loads]
        if sizes.ablation:
            cases.append(("moe_unfused", "tiled_gmm", sorted_tiled_gmm, "skewed", False))
        variants = [peak_variant(sizes.peak_n, key)] + _ffn_variants(shape, jax.random.fold_in(key, g), cases,
                                                                     slow_reps=0)
        groups.append(Group(f"G={g} E={shape.num_experts} top-{shape.top_k} F={shape.d_expert} T={shape.tokens}",
                            variants))
    return groups


def backend_groups(sizes: Sizes, key, *, slow_reps: int) -> list[Group]:
    """Every dispatch backend (and 'auto') at a reduced T: the dense reference and XLA:CPU's ragged_dot compute
    E/K x and E x the useful FLOPs."""
    groups = []
    for g, tokens in sizes.backend_tokens:
        shape = granular_shape(sizes, g, tokens)
        cases = []
        for load in sizes.loads:
            for backend in ("dense", "ragged_dot", "kernel", "tiled", "capacity"):
                cases.append(("moe", backend, moe_fn(backend), load, backend in ("dense", "ragged_dot")))
        if sizes.auto_variant:
            cases.append(("moe", "auto", moe_fn("auto"), "skewed", False))
        variants = [peak_variant(sizes.peak_n, key)] + _ffn_variants(shape, jax.random.fold_in(key, 100 + g), cases,
                                                                     slow_reps=slow_reps)
        groups.append(Group(f"backends G={g} E={shape.num_experts} top-{shape.top_k} F={shape.d_expert} "
                            f"T={shape.tokens}", variants,
                            note=f"every backend; reduced T={tokens}; dense/ragged_dot: {slow_reps} reps"))
    return groups


def router_groups(sizes: Sizes, key) -> list[Group]:
    """The routers' own cost (routing.route on given logits), forward and forward+backward (gradient of the
    combine weights w.r.t. the logits), next to the dense FFN of the same T for scale."""
    groups = []
    for num_experts, top_k in sizes.router_shapes:
        g = num_experts // sizes.base_experts
        shape = granular_shape(sizes, g)
        x, _, dense, _, _, cot = _moe_inputs(shape, jax.random.fold_in(key, 200 + g))
        k_l, k_c, k_r = jax.random.split(jax.random.fold_in(key, 300 + g), 3)
        logits = jax.random.normal(k_l, (shape.tokens, num_experts), jnp.float32)
        cot_w = jax.random.normal(k_c, (shape.tokens, top_k), jnp.float32)
        variants = [peak_variant(sizes.peak_n, key)]
        for mode in (FWD, FWD_BWD):
            base = f"dense_ffn/{mode}"
            variants.append(Variant(base, with_mode(dense_ffn, mode, (0, 1)), (dense, x, cot),
                                    shape.useful_flops(mode),
                                    meta={"case": "dense_ffn", "mode": mode, "backend": "dense_ffn", "load": "-",
                                          "shape": shape.as_dict()}))
            for name in ("sparsemixer_v2", "topk_softmax"):
                def route_weights(logits_TE, rng, name=name, top_k=top_k):
                    return routing.route(name, logits_TE, top_k=top_k, training=True, rng=rng).weights
                variants.append(Variant(f"router/{name}/{mode}", with_mode(route_weights, mode, (0,)),
                                        (logits, k_r, cot_w), 0.0, baseline=base,
                                        meta={"case": "router", "mode": mode, "backend": name, "load": "-",
                                              "shape": {"T": shape.tokens, "E": num_experts, "K": top_k}}))
        groups.append(Group(f"routers E={num_experts} top-{top_k} T={shape.tokens}", variants,
                            note="router cost vs the dense FFN of the same T"))
    return groups


def tiny_config(name: str, sizes: Sizes):
    """configs/<name>.py (grin_tiny, dense_tiny) with sizes.train_variant, its data.seq_len set to
    sizes.train_seq_len unless a variant is named (the smoke variant keeps its own)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(root, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(sizes.train_variant)
    if not sizes.train_variant:
        config.data.seq_len = sizes.train_seq_len
    return config


def train_step_group(sizes: Sizes, key) -> tuple[list[Group], str | None]:
    """grin_tiny vs dense_tiny: one whole optimizer step (forward, backward, AdamW) on a synthetic batch of
    train.batch_size x sizes.train_seq_len tokens, jitted with the state donated and carried from call to call, as
    the trainer runs it; and transformers' PhimoeForCausalLM (the tool a user would
    otherwise pick: eager PyTorch, AdamW) with the same shape and the same batch (hf_config_from_model_config of
    grin_tiny), when torch and transformers are installed (the test extra). The PhiMoE row's 'x dense' is its time
    over grin_tiny's: above 1, grin-jax's step is faster.

    Returns ([group], None) or ([], reason) when the trainer or the configs cannot be loaded here; a missing
    PyTorch peer is reported in the group's note."""
    if not sizes.train_step:
        return [], "train-step case (grin_tiny vs dense_tiny) skipped: not part of --quick (pass --train-step)"
    try:
        from grin_jax import params as _params
        from grin_jax.train import optim, trainer
        variants = [peak_variant(sizes.peak_n, key)]
        for name in ("dense_tiny", "grin_tiny"):
            config = tiny_config(name, sizes)
            experiment = trainer.resolve(config, check_mesh=False)
            tc = config.train
            tx, _ = optim.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                                         total_steps=tc.steps)
            graphdef, state = trainer.init_state(experiment, tx)
            batch_size, seq_len = tc.batch_size, config.data.seq_len
            k_in = jax.random.fold_in(key, 400)
            tokens = jax.random.randint(k_in, (batch_size, seq_len + 1), 0, experiment.model.vocab_size)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                     "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}
            step = _DonatedStep(trainer.make_train_step(graphdef, tx), state)  # as the trainer runs it
            shape = {"batch": batch_size, "seq_len": seq_len, "tokens": batch_size * seq_len}
            flops = train_step_flops(experiment.model, _params.count_params(experiment.model), batch_size, seq_len)
            variants.append(Variant(f"train_step/{name}", step, (batch,), flops,
                                    baseline=None if name == "dense_tiny" else "train_step/dense_tiny",
                                    meta={"case": "train_step", "mode": "train_step", "load": "router",
                                          "backend": getattr(config.model, "moe_backend", "-") if name == "grin_tiny"
                                          else "dense_ffn", "shape": shape}))
        peer, missing = phimoe_train_step_variant(experiment.model, tokens, tc.learning_rate, flops)
        variants += peer
        note = "whole optimizer step, synthetic tokens"
        note += ("; transformers_phimoe x dense = its time / grin_tiny's (> 1: grin-jax faster)" if peer
                 else f"; PhiMoE peer skipped: {missing}")
        groups = [Group(f"train step grin_tiny vs dense_tiny vs transformers PhiMoE B={shape['batch']} "
                        f"S={shape['seq_len']}{' (smoke)' if sizes.train_variant else ''}", variants, note=note)]
        return groups + main_job_loop_groups(sizes, key), None
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return [], f"train-step case skipped: {type(error).__name__}: {error}"


def main_job_loop_groups(sizes: Sizes, key) -> list[Group]:
    """The main job as a user runs it (`python -m grin_jax.train --config=configs/grin_tiny.py
    --config.data.seq_len=256`): trainer.LoopSteps, sizes.loop_steps steps of the trainer's own loop per call (the
    data pipeline's batches, the step, the previous step's metrics read and checked, metrics.jsonl), against
    transformers' PhimoeForCausalLM trained on the same config's data pipeline with a plain PyTorch loop
    (phimoe_loop_variant), interleaved, with the group's matmul peak."""
    import atexit
    import shutil
    import tempfile

    from grin_jax import params as _params
    from grin_jax.train import trainer
    config = tiny_config("grin_tiny", sizes)
    workdir = tempfile.mkdtemp(prefix="grin_jax_bench_loop_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    loop = trainer.LoopSteps(config, workdir, sizes.loop_steps)
    atexit.register(loop.close)
    batch_size, seq_len, steps = config.train.batch_size, config.data.seq_len, sizes.loop_steps
    model_config = loop.run.experiment.model
    flops = steps * train_step_flops(model_config, _params.count_params(model_config), batch_size, seq_len)
    shape = {"batch": batch_size, "seq_len": seq_len, "steps": steps, "tokens": steps * batch_size * seq_len}
    variants = [peak_variant(sizes.peak_n, key),
                Variant("loop/grin_tiny", loop, (), flops,
                        meta={"case": "main_job_loop", "mode": "train_step", "load": "router",
                              "backend": "grin_jax.train loop", "shape": shape})]
    peer, missing = phimoe_loop_variant(config, steps, flops)
    note = (f"the main job's loop, {steps} steps per call on its data pipeline"
            + ("; transformers_phimoe x dense = its time / grin_tiny's (> 1: grin-jax faster)" if peer
               else f"; PhiMoE peer skipped: {missing}"))
    return [Group(f"main-job loop grin_tiny vs transformers PhiMoE B={batch_size} S={seq_len}"
                  f"{' (smoke)' if sizes.train_variant else ''}", variants + peer, note=note)]


def train_step_flops(model_config, counts: dict, batch: int, seq_len: int) -> float:
    """The useful FLOPs of one optimizer step on batch x seq_len tokens: 6 per active parameter and token (forward 2,
    backward 4; the embedding lookup excluded, the LM head included) plus the attention core, 3 x 2 matmuls x 2 FLOPs
    x heads x head_dim x the (S + 1) / 2 keys a causal query sees on average, per token and layer."""
    tokens = batch * seq_len
    dense = 6 * (counts["active"] - counts["embedding_active"]) * tokens
    attention = (3 * 2 * 2 * model_config.num_heads * model_config.head_dim * (seq_len + 1) / 2
                 * tokens * model_config.num_layers)
    return float(dense + attention)


def _phimoe(model_config, learning_rate: float):
    """(transformers' PhimoeForCausalLM built from `model_config` (convert.hf.hf_config_from_model_config: the same
    shapes, router and jitter) in train mode, its torch AdamW, the backend's description); torch threads = the
    machine's cores. ImportError without torch / transformers (the test extra)."""
    import os

    import torch
    import transformers

    from grin_jax.convert import hf
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**hf.hf_config_from_model_config(model_config)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    backend = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
               f"{torch.get_num_threads()} threads")
    return model, opt, backend


def phimoe_train_step_variant(model_config, tokens, learning_rate: float,
                              flops: float = 0.0) -> tuple[list[Variant], str | None]:
    """transformers' PhimoeForCausalLM built from `model_config` (`_phimoe`), one AdamW step (loss, backward, step,
    zero_grad) on the same tokens. ([variant], None), or ([], why) without torch / transformers (the test extra)."""
    try:
        import torch
        model, opt, backend = _phimoe(model_config, learning_rate)
    except ImportError as error:
        return [], f"{error} (pip install -e '.[test]')"
    ids = torch.from_numpy(np.asarray(tokens[:, :-1], np.int64))

    def call():
        model(input_ids=ids, labels=ids).loss.backward()  # labels shifted inside: the same next-token targets
        opt.step()
        opt.zero_grad(set_to_none=True)

    call.model = model  # for inspection (tests)
    batch, seq = ids.shape
    return [Variant("train_step/transformers_phimoe", _TorchCall(call), (), flops, baseline="train_step/grin_tiny",
                    meta={"case": "train_step_peer", "mode": "train_step", "load": "router", "backend": backend,
                          "shape": {"batch": batch, "seq_len": seq, "tokens": batch * seq}})], None


def phimoe_loop_variant(config, steps: int, flops: float = 0.0) -> tuple[list[Variant], str | None]:
    """The PyTorch loop a user would write around transformers' PhimoeForCausalLM (`_phimoe` of the config's model),
    `steps` steps per call on a fresh iterator of the same data pipeline (data.make_dataset of config.data, the same
    batch size and seed): the batch to tensors, forward with the documents' position ids (transformers then masks
    attention to each packed document, as grin-jax's data.document_attention does), cross-entropy over the
    loss-masked targets, backward, AdamW step, the loss read. ([variant], None), or ([], why) without torch /
    transformers."""
    try:
        import torch
        from grin_jax import data as _data
        from grin_jax.train import trainer
        model, opt, backend = _phimoe(trainer.resolve(config, check_mesh=False).model, config.train.learning_rate)
    except ImportError as error:
        return [], f"{error} (pip install -e '.[test]')"
    batches, _ = _data.make_dataset(config.data, batch_size=config.train.batch_size, seed=config.train.seed)
    losses = []

    def call():
        for _ in range(steps):
            batch = {k: torch.from_numpy(np.asarray(v)) for k, v in next(batches).items()}
            targets = torch.where(batch["loss_mask"] > 0, batch["targets"].long(), -100)
            logits = model(input_ids=batch["inputs"].long(), position_ids=batch["positions"].long(),
                           use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

    call.model, call.losses = model, losses  # for inspection (tests)
    batch_size, seq_len = config.train.batch_size, config.data.seq_len
    return [Variant("loop/transformers_phimoe", _TorchCall(call), (), flops, baseline="loop/grin_tiny",
                    meta={"case": "main_job_loop_peer", "mode": "train_step", "load": "router", "backend": backend,
                          "shape": {"batch": batch_size, "seq_len": seq_len, "steps": steps,
                                    "tokens": steps * batch_size * seq_len}})], None


# ------------------------------------------------------------------------------------------------ PEER
def gelu_ffn(params, x_TD):
    """The dense baseline of a PEER layer: a 2-matrix GELU FFN of width 4 D."""
    return jax.nn.gelu(x_TD @ params["w_in"], approximate=False) @ params["w_out"]


def stream_variant(n: int, key) -> Variant:
    """The machine's memory bandwidth: y = a + 2 b over n float32 (reads 2n, writes n: 12 n bytes)."""
    a = jax.random.normal(key, (n,), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n,), jnp.float32)
    return Variant("stream_triad", jax.jit(lambda a, b: a + 2.0 * b), (a, b), 2.0 * n, bytes=12.0 * n,
                   meta={"case": "stream_triad", "mode": "triad", "backend": "xla", "load": "-", "shape": {"n": n}})


class _TorchCall:
    """A PyTorch callable in the harness's shape (`fn.lower(*args).compile()` -> a callable): eager, no compilation,
    no XLA memory analysis; CPU PyTorch is synchronous, so the call's return is its end."""

    def __init__(self, fn):
        self.fn = fn

    def lower(self, *args):
        return self

    def compile(self, *args):
        return lambda *args: self.fn(*args)


def peer_pytorch_variants(config, T: int, mode: str, flops: float, baseline: str) -> list[Variant]:
    """peer-pytorch's PEER (the tool a user would otherwise pick) with the same shapes and the paper's scoring
    (softmax over the k scores: non_competing_scores=False), on the same number of tokens; forward, or forward +
    backward (every parameter's and x's gradient). [] when peer-pytorch or torch is not installed."""
    try:
        import torch
        import PEER_pytorch
    except ImportError:
        return []
    torch.manual_seed(0)
    D = config.d_model
    layer = PEER_pytorch.PEER(D, heads=config.heads, num_experts=config.num_experts,
                              num_experts_per_head=config.top_k, dim_key=config.d_key // 2,
                              non_competing_scores=False, pre_rmsnorm=False)
    x = torch.randn(1, T, D, requires_grad=(mode == FWD_BWD))
    cot = torch.randn(1, T, D)

    def call():
        if mode == FWD:
            with torch.no_grad():
                layer(x)
            return None
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x) * cot).sum().backward()
        return None

    return [Variant(f"peer_pytorch/{mode}", _TorchCall(call), (), flops, baseline=baseline,
                    meta={"case": "peer_pytorch", "mode": mode, "backend": f"torch {torch.__version__}", "load": "-",
                          "shape": {"tokens": T, "d_model": D, "num_experts": config.num_experts,
                                    "heads": config.heads, "top_k": config.top_k}})]


def peer_groups(sizes: Sizes, key) -> list[Group]:
    """A PEER layer (ffn/peer.py, the paper's defaults: query BatchNorm, shared sub-keys and experts, softmax gates,
    GELU experts; h heads, top-k, N experts) against a GELU FFN of width 4 D on T tokens, forward and
    forward+backward (gradients of every parameter and of x), one group per N, next to peer-pytorch's PEER with the
    same shapes (`peer_pytorch/*`: per-head sub-keys, no query BatchNorm, eager PyTorch); `peer_rows/fwd+bwd`: the
    backward of the row-sparse update (peer.table_update='sparse': the gathered rows' gradients instead of the
    tables'; every other parameter's and x's as before).
    Useful FLOPs per token: the baseline's 2·2·D·4D; PEER's queries 2·D·H·Q, product-key scores 2·H·2·n·Q/2 and
    top-k candidates 2·H·k², experts 2·2·H·k·D (forward; forward+backward 3x).
    Least bytes (the roofline's memory side; x, y and the small weights left out): PEER reads the M = T·H·k rows of
    both tables, 2·M·D·4 bytes, in the forward; its backward writes their gradients, as many bytes again, plus
    with dense tables the [N, D] gradients (2·N·D·4). The dense FFN reads its 2·D·4D weights and writes and reads its
    T·4D hidden activations (x 3 for forward+backward). stream_triad measures the bandwidth they are held against."""
    from flax import nnx

    from grin_jax.ffn import peer

    T, D, H, K = sizes.peer_tokens, sizes.peer_d_model, sizes.peer_heads, sizes.peer_top_k
    k_x, k_c, k_w = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (T, D), jnp.float32)
    cot = jax.random.normal(k_c, (T, D), jnp.float32)
    w1, w2 = jax.random.split(k_w)
    dense = {"w_in": jax.random.normal(w1, (D, 4 * D)) / D ** 0.5, "w_out": jax.random.normal(w2, (4 * D, D)) / (2 * D)}
    dense_flops = 2 * 2 * D * 4 * D * T
    dense_bytes = 4 * (2 * D * 4 * D + 2 * T * 4 * D)
    rows_bytes = 2 * T * H * K * D * 4
    groups = []
    for n_experts in sizes.peer_experts:
        config = peer.PEERConfig(d_model=D, num_experts=n_experts, heads=H, top_k=K, table_update="sparse")
        module = peer.PEERFFN(config, rngs=nnx.Rngs(0))
        graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
        tables, rest = nnx.split_state(params, lambda path, _: path[-1] in ("w_in", "w_out"), ...)
        sinks = {name: jnp.zeros(s.shape, s.dtype) for name, s in module.row_sink_shapes(T).items()}

        def peer_fn(params, x_TD, graphdef=graphdef, stats=stats):
            model = nnx.merge(graphdef, params, stats, copy=True)
            y, _ = model(x_TD[None], training=True)
            return y[0]

        def peer_rows_fn(rest, x_TD, sinks, tables, graphdef=graphdef, stats=stats):
            model = nnx.merge(graphdef, rest, tables, stats, copy=True)
            y, _ = model(x_TD[None], training=True, row_sinks=sinks)
            return y[0]

        n, Q = config.num_keys, config.d_key
        flops = T * (2 * D * H * Q + 2 * H * n * Q + 2 * H * K * K + 2 * 2 * H * K * D)
        variants = [peak_variant(sizes.peak_n, key), stream_variant(sizes.stream_n, key)]
        shape = {"tokens": T, "d_model": D, "num_experts": n_experts, "heads": H, "top_k": K, "d_key": config.d_key}
        meta = {"case": "peer", "backend": "peer", "load": "-", "shape": shape, "chunk_tokens": config.chunk_tokens}
        for mode in (FWD, FWD_BWD):
            scale = 3 if mode == FWD_BWD else 1
            base = f"gelu_ffn_4d/{mode}"
            variants.append(Variant(base, with_mode(gelu_ffn, mode, (0, 1)), (dense, x, cot), scale * dense_flops,
                                    bytes=scale * dense_bytes,
                                    meta={"case": "gelu_ffn_4d", "mode": mode, "backend": "dense_ffn", "load": "-",
                                          "shape": {"tokens": T, "d_model": D, "width": 4 * D}}))
            table_bytes = 0 if mode == FWD else rows_bytes + 2 * n_experts * D * 4
            variants.append(Variant(f"peer/{mode}", with_mode(peer_fn, mode, (0, 1)), (params, x, cot),
                                    scale * flops, baseline=base, bytes=rows_bytes + table_bytes,
                                    meta={**meta, "mode": mode}))
            variants += peer_pytorch_variants(config, T, mode, scale * flops, base)
        variants.append(Variant(f"peer_rows/{FWD_BWD}", with_mode(peer_rows_fn, FWD_BWD, (0, 1, 2)),
                                (rest, x, sinks, tables, cot), 3 * flops, baseline=f"gelu_ffn_4d/{FWD_BWD}",
                                bytes=2 * rows_bytes, meta={**meta, "mode": FWD_BWD, "table_update": "sparse"}))
        groups.append(Group(f"PEER N={n_experts:,} h={H} k={K} d={D} T={T}", variants,
                            note="PEER against a GELU FFN of width 4d"))
    return groups


class _DonatedStep:
    """A train step timed as the trainer runs it: jitted with the state donated (updated in place: the row-sparse
    update's scatters touch only the retrieved rows) and carried from call to call. In the harness's shape:
    `lower(batch).compile()` -> a callable of the batch, with XLA's memory analysis."""

    def __init__(self, step, state):
        self.jitted, self.state, self.compiled = jax.jit(step, donate_argnums=(0,)), state, None

    def lower(self, batch):
        self.compiled = self.jitted.lower(self.state, batch).compile()
        return self

    def compile(self, *args):
        return self

    def memory_analysis(self):
        return self.compiled.memory_analysis()

    def __call__(self, batch):
        self.state, metrics = self.compiled(self.state, batch)
        return metrics


def peer_train_step_groups(sizes: Sizes, key) -> list[Group]:
    """One optimizer step (forward, backward, AdamW; trainer.make_train_step) of a one-block LM whose FFN is a PEER
    layer (d_model D, h heads, top-k, T = batch x seq tokens), at the smallest and the largest N of
    `sizes.peer_experts`, with the dense table update and the row-sparse one (peer.table_update). Each variant's
    ratio is to the smallest N with the same update: the issue's 'train step at N = 1024^2 <= 2x that at 128^2'.
    The state is donated and carried over, as in the trainer (_DonatedStep)."""
    from grin_jax import presets
    from grin_jax.train import trainer

    D, H, K, T = sizes.peer_d_model, sizes.peer_heads, sizes.peer_top_k, sizes.peer_tokens
    seq = min(128, T)
    small, large = min(sizes.peer_experts), max(sizes.peer_experts)
    tokens = jax.random.randint(jax.random.fold_in(key, 500), (T // seq, seq + 1), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((T // seq, seq), jnp.float32)}
    variants = []
    for update in ("dense", "sparse"):
        for n_experts in (small, large):
            config = presets.tiny(None, name="peer_bench", layout="peer")
            config.model.update(num_layers=1, d_model=D, head_dim=D // config.model.num_heads)
            config.model.peer = {"num_experts": n_experts, "heads": H, "top_k": K, "table_update": update}
            config.data.seq_len, config.train.batch_size = seq, T // seq
            experiment = trainer.resolve(config, check_mesh=False)
            tx, _ = trainer.make_optimizer(config.train, experiment.model)
            graphdef, state = trainer.init_state(experiment, tx)
            name = f"train_step/{update}/N={n_experts}"
            variants.append(Variant(name, _DonatedStep(trainer.make_train_step(graphdef, tx), state), (batch,), 0.0,
                                    baseline=None if n_experts == small else f"train_step/{update}/N={small}",
                                    meta={"case": "peer_train_step", "mode": "train_step", "backend": "peer",
                                          "load": "-", "table_update": update,
                                          "shape": {"tokens": T, "d_model": D, "num_experts": n_experts,
                                                    "heads": H, "top_k": K}}))
    return [Group(f"PEER train step N={small:,} vs {large:,} h={H} k={K} d={D} T={T}", variants,
                  note=f"x dense here: time / that at N={small:,} with the same table update")]


# ------------------------------------------------------------------------------------------------ DS-MoE
def _ffn_params(key, d_model: int, width: int, gated: bool) -> dict:
    """A dense FFN's weights: SwiGLU (w_gate, w_up, w_down) when gated, else GELU (w_in, w_out)."""
    k1, k2, k3 = jax.random.split(key, 3)
    w_in = jax.random.normal(k1, (d_model, width), jnp.float32) / d_model ** 0.5
    w_out = jax.random.normal(k2, (width, d_model), jnp.float32) / width ** 0.5
    if not gated:
        return {"w_in": w_in, "w_out": w_out}
    return {"w_gate": jax.random.normal(k3, (d_model, width), jnp.float32) / d_model ** 0.5, "w_up": w_in,
            "w_down": w_out}


def ds_moe_layer_groups(sizes: Sizes, key) -> list[Group]:
    """The DS-MoE layer (ffn/ds_moe.py, SwiGLU experts of width F = 4 D / N) at inference: forward, jitted,
    training=False, on T tokens; the same parameters with inference='dense' (every expert, ffn.ds_moe.dense_mixture:
    one matmul pair of width N F; the baseline) and inference='top_k' for each K of `sizes.ds_top_ks` (only K experts
    per token, dispatch backend 'auto': the C++ kernel on CPU; at K = sizes.ds_top_k also the pure-XLA 'tiled').
    References on the same tokens: a SwiGLU FFN of width N F (= 4 D: the dense mode's parameters and FLOPs, without
    router), a GELU FFN of width 4 D, and a SwiGLU FFN of width K F (the top-K layer's active expert FLOPs: what the
    sparse path would cost at dense-matmul efficiency). Issue target: the dense mode >= 4x the time of top-4.
    FLOPs per token: router 2 D N, experts 2·3·D·F per active expert (N for the dense mode, K for top-K)."""
    from flax import nnx

    from grin_jax.ffn import ds_moe

    T, D, N = sizes.ds_tokens, sizes.ds_d_model, sizes.ds_experts
    k_x, k_f = jax.random.split(jax.random.fold_in(key, 600))
    x = jax.random.normal(k_x, (1, T, D), jnp.float32)

    def layer(**inference):
        config = ds_moe.DSMoEConfig(d_model=D, num_experts=N, backend=inference.pop("backend", "auto"), **inference)
        return ds_moe.DSMoEFFN(config, rngs=nnx.Rngs(0))  # same seed: the same parameters in every mode

    dense_layer = layer()
    F = dense_layer.config.d_hidden
    graphdef_dense, params = nnx.split(dense_layer)
    scores = dense_layer.scores(x[0])
    shape = {"T": T, "D": D, "E": N, "F": F, "total_width": N * F}
    router_flops = 2.0 * T * D * N

    def expert_flops(k):
        return 2.0 * T * D * F * 3 * k

    def forward(graphdef):
        return jax.jit(lambda params, x_BSD: nnx.merge(graphdef, params)(x_BSD, training=False)[0])

    base = "ds_moe/dense"
    variants = [peak_variant(sizes.peak_n, key),
                Variant(base, forward(graphdef_dense), (params, x), router_flops + expert_flops(N),
                        meta={"case": "ds_moe_layer", "mode": FWD, "backend": "dense_mixture", "load": "-",
                              "inference": "dense", "shape": {**shape, "K": N}})]
    rows = [(k, "auto") for k in sizes.ds_top_ks] + [(sizes.ds_top_k, "tiled")]
    for k, backend in rows:
        graphdef, _ = nnx.split(layer(inference="top_k", inference_top_k=k, backend=backend))
        resolved = dispatch.resolve_backend(backend, activation="swiglu", dtype=jnp.float32)
        meta = {"case": "ds_moe_layer", "mode": FWD, "backend": backend, "resolves_to": resolved, "load": "router",
                "inference": "top_k", "shape": {**shape, "K": k}, "report_speedup": True,
                **load_stats(jax.lax.top_k(scores, k)[1])}
        if resolved == "kernel":
            meta["scratch_bytes"] = cpu_kernel.scratch_bytes(T, k, D, F)
        name = f"ds_moe/top-{k}" + ("" if backend == "auto" else f"/{backend}")
        variants.append(Variant(name, forward(graphdef), (params, x), router_flops + expert_flops(k), meta=meta,
                                baseline=base))
    # The threshold mode with N slots (exact on every token): eps chosen so that ~ds_top_k experts pass on average;
    # the kernel skips the zero-weight slots at inference, so its time should follow the active count, not N.
    eps = float(N * jnp.quantile(scores, 1.0 - sizes.ds_top_k / N))
    graphdef, _ = nnx.split(layer(inference="threshold", inference_top_k=N, inference_threshold=eps))
    passing = float(jnp.mean(jnp.sum(N * scores > eps, axis=-1)))
    variants.append(Variant(f"ds_moe/threshold~{passing:.1f}", forward(graphdef), (params, x),
                            router_flops + expert_flops(passing), baseline=base,
                            meta={"case": "ds_moe_layer", "mode": FWD, "backend": "auto", "load": "router",
                                  "inference": "threshold", "threshold": eps, "mean_active": passing,
                                  "shape": {**shape, "K": N}, "report_speedup": True}))
    for label, width, gated in ((f"swiglu_ffn/width={N * F}", N * F, True), (f"gelu_ffn/width={4 * D}", 4 * D, False),
                                (f"swiglu_ffn/width={sizes.ds_top_k * F}", sizes.ds_top_k * F, True)):
        ffn = _ffn_params(jax.random.fold_in(k_f, width + gated), D, width, gated)
        fn = dense_ffn if gated else gelu_ffn
        variants.append(Variant(label, jax.jit(lambda p, x_BSD, fn=fn: fn(p, x_BSD[0])), (ffn, x),
                                2.0 * T * D * width * (3 if gated else 2), baseline=base,
                                meta={"case": "dense_ffn", "mode": FWD, "backend": "dense_ffn", "load": "-",
                                      "activation": "swiglu" if gated else "gelu",
                                      "shape": {"T": T, "D": D, "width": width}}))
    return [Group(f"DS-MoE layer E={N} F={F} top-{'/'.join(map(str, sizes.ds_top_ks))} d={D} T={T}", variants,
                  note=f"inference forward; x dense: time / the dense mode (all {N} experts); "
                       f"target: top-{sizes.ds_top_k} >= 4x faster")]


def _merged(values: dict, overrides) -> dict:
    """values updated by overrides; a mapping-valued override of a mapping-valued key (an FFN or attention section)
    updates that section's keys, as ModelConfig.replace does."""
    out = dict(values)
    for key, value in (overrides or {}).items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def ds_moe_model_config(sizes: Sizes, seq: int, *, top_k: int | None = None, attention_top_k: int | None = None,
                        model_overrides: dict | None = None):
    """The benchmark's DS-MoE LM (every layer ds_moe, N = sizes.ds_experts SwiGLU experts of width 4 D / N, and a
    mixture of attention heads of sizes.ds_model_attention_experts experts over sizes.ds_model_kv_heads shared KV
    heads) for sequences of `seq` tokens; top_k / attention_top_k None: inference='dense' for the MLP / attention
    experts, else inference='top_k' with that K.
    model_overrides: merged into the ModelConfig.make keywords (a mapping value updates that section's keys; e.g.
    an attention-experts section); the ds_moe inference setting is applied after them."""
    from grin_jax import models

    D, H = sizes.ds_d_model, sizes.ds_model_heads
    values = {"vocab_size": sizes.ds_model_vocab, "d_model": D, "num_layers": sizes.ds_model_layers, "num_heads": H,
              "num_kv_heads": sizes.ds_model_kv_heads, "max_seq_len": seq, "layout": "ds_moe",
              "ds_moe": {"num_experts": sizes.ds_experts}, "moa": {"num_experts": sizes.ds_model_attention_experts}}
    values = _merged(values, model_overrides)

    def inference(k):
        return {"inference": "dense"} if k is None else {"inference": "top_k", "inference_top_k": k}

    values = _merged(values, {"ds_moe": inference(top_k)})
    if values.get("moa") is not None:
        values = _merged(values, {"moa": inference(attention_top_k)})
    return models.ModelConfig.make(**values)


def _lm_forward_flops(config, batch: int, seq: int, top_k: int, attention_top_k: int | None = None) -> float:
    """FLOPs of the LM's forward as computed: per layer q/k/v/o projections, scores and values over the full S x S
    (the einsum attention masks, it does not skip; with attention experts, the q/o projections and the scores of
    attention_top_k of the E experts' heads, plus the router 2 D E), router and top_k SwiGLU experts; the LM head."""
    T, D, hd = batch * seq, config.d_model, config.resolved_head_dim
    H, G = config.num_heads, config.num_kv_heads
    ffn = config.section("ds_moe")
    share, router = 1.0, 0
    if config.moa is not None:
        share = (config.moa.num_experts if attention_top_k is None else attention_top_k) / config.moa.num_experts
        router = 2 * T * D * config.moa.num_experts
    attention = 2 * T * D * hd * 2 * G + share * (2 * T * D * hd * 2 * H + 2 * 2 * T * seq * H * hd) + router
    experts = 2 * T * D * ffn.num_experts + 2 * T * D * ffn.d_hidden * 3 * top_k
    return float(config.num_layers * (attention + experts) + 2 * T * D * config.vocab_size)


def ds_moe_model_groups(sizes: Sizes, key, *, model_overrides: dict | None = None,
                        sparse_overrides: dict | None = None) -> list[Group]:
    """A whole DS-MoE LM's eval forward (jitted, training=False, logits [B, S, V]; ds_moe_model_config) on B x S
    synthetic tokens, one group per (B, S) of `sizes.ds_model_shapes`: the same parameters with inference='dense'
    for the MLP and the attention experts (the baseline), then MLP top-K at K = sizes.ds_model_top_k (~30 % of the
    experts; issue target: the dense mode >= 1.5x its time) and MLP top-1, both with the attention experts at top-1
    (25 % of the query heads; the K/V heads, shared, always run). The shorter sequence shows attention's share of
    the time smaller.
    model_overrides: merged into every variant's ModelConfig.make keywords; sparse_overrides: merged on top of them
    into the sparse variants' only (e.g. the sparsity of another kind of experts)."""
    from grin_jax import models

    groups = []
    for batch, seq in sizes.ds_model_shapes:
        dense_config = ds_moe_model_config(sizes, seq, model_overrides=model_overrides)
        graphdef, params = models.init(dense_config, rng=0)
        tokens = jax.random.randint(jax.random.fold_in(key, 700 + seq), (batch, seq), 0, dense_config.vocab_size)
        N = sizes.ds_experts
        shape = {"batch": batch, "seq": seq, "tokens": batch * seq, "d_model": dense_config.d_model,
                 "layers": dense_config.num_layers, "heads": dense_config.num_heads,
                 "vocab": dense_config.vocab_size, "E": N, "F": dense_config.section("ds_moe").d_hidden}
        base = "ds_moe_lm/dense"
        variants = [peak_variant(sizes.peak_n, key)]
        attention_k = 1 if dense_config.moa is not None else None  # the sparse rows' attention: top-1 of E
        for k in (None, sizes.ds_model_top_k, 1):
            if k is None:
                config = dense_config
            else:
                config = ds_moe_model_config(sizes, seq, top_k=k, attention_top_k=attention_k,
                                             model_overrides=_merged(model_overrides or {}, sparse_overrides))
            graphdef, _ = models.abstract_init(config)
            fn = jax.jit(lambda params, tokens_BS, graphdef=graphdef: models.apply(graphdef, params, tokens_BS)[0])
            active = N if k is None else k
            attention_active = None if (k is None or config.moa is None) else config.moa.inference_top_k
            meta = {"case": "ds_moe_lm", "mode": FWD, "backend": config.section("ds_moe").backend,
                    "load": "router", "inference": "dense" if k is None else "top_k",
                    "shape": {**shape, "K": active, "active_fraction": active / N,
                              "attention_experts": None if config.moa is None else config.moa.num_experts,
                              "attention_K": attention_active}}
            if k is not None:
                meta["report_speedup"] = True
            variants.append(Variant(base if k is None else f"ds_moe_lm/top-{k}" + (
                                        "" if attention_active is None else f"+attn-top-{attention_active}"),
                                    fn, (params, tokens),
                                    _lm_forward_flops(config, batch, seq, active, attention_active), meta=meta,
                                    baseline=None if k is None else base))
        groups.append(Group(f"DS-MoE LM L={dense_config.num_layers} d={dense_config.d_model} E={N} "
                            f"top-{sizes.ds_model_top_k} B={batch} S={seq} V={dense_config.vocab_size}", variants,
                            note=f"eval forward, logits; x dense: time / the dense mode; "
                                 f"target: top-{sizes.ds_model_top_k} >= 1.5x faster"))
    return groups
