"""Hugging Face PhiMoE (GRIN-MoE, Phi-3.5-MoE) and Mixtral checkpoints <-> grin_jax parameters.

Naming. grin_jax parameters are flattened as in `grin_jax.models.flatten_params` ('layers.0.attn.q.kernel',
...). Hugging Face weights are the `PhimoeForCausalLM` / `MixtralForCausalLM` state dict in one of two layouts:

  5.x (fused experts; the in-memory module names of transformers >= 5):
    model.layers.{i}.mlp.router.weight [E, D]            (PhiMoE)   |  model.layers.{i}.mlp.gate.weight [E, D] (Mixtral)
    model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, D] (gate rows first, then up)
    model.layers.{i}.mlp.experts.down_proj [E, D, F]
  4.x (per-expert; what the hub checkpoints and transformers 5.x `save_pretrained` write):
    model.layers.{i}.block_sparse_moe.gate.weight [E, D]
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight [F, D] (gate), .w3.weight [F, D] (up), .w2.weight [D, F]
  both: model.embed_tokens.weight [V, D]; model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias};
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.{weight,bias}; model.norm.{weight,bias};
    lm_head.{weight,bias} (lm_head.weight absent when tie_word_embeddings).

grin_jax layouts: q kernel [D, H, K], k/v [D, G, K], o [H, K, D], router [D, E], w_gate/w_up [E, D, F],
w_down [E, F, D], lm_head kernel [D, V]. All conversions are transposes / reshapes / slices (bit exact).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Mapping

import numpy as np

from grin_jax.models.config import DTYPES, ModelConfig

FAMILIES = ("phimoe", "mixtral")
LAYOUTS = ("5.x", "4.x")
ARCHITECTURES = {"phimoe": "PhimoeForCausalLM", "mixtral": "MixtralForCausalLM"}
_ROPE_DEFAULT_THETA = 1_000_000.0  # transformers' default_theta for both configs when none is given


# ------------------------------------------------------------------------------------------------- configs
def _rope_theta(hf: Mapping) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", hf.get("rope_theta", _ROPE_DEFAULT_THETA))
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = hf.get("rope_theta", _ROPE_DEFAULT_THETA)
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported: accepted values are 'default' (plain RoPE; "
                         "long-context scalings such as Phi-3.5-MoE's longrope are not implemented)")
    return float(theta)


def model_config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """A transformers PhimoeConfig / MixtralConfig (config.json as a dict) -> ModelConfig.

    Mapping: hidden_size -> d_model, intermediate_size -> moe.d_hidden, num_hidden_layers -> num_layers,
    num_attention_heads -> num_heads, num_key_value_heads -> num_kv_heads, head_dim, max_position_embeddings ->
    max_seq_len, rms_norm_eps -> norm_eps (also the LayerNorm eps of PhiMoE), rope_theta / rope_parameters,
    sliding_window, num_local_experts -> moe.num_experts, num_experts_per_tok -> moe.top_k, tie_word_embeddings ->
    tie_embeddings, router_aux_loss_coef -> moe.load_balance_coef, dtype / torch_dtype -> param_dtype.
    PhiMoE: LayerNorm, router 'sparsemixer_v2', router_jitter_noise -> moe.router_options.jitter_eps,
      input_jitter_noise -> moe.input_jitter, attention_bias, lm_head_bias.
    Mixtral: RMSNorm, router 'topk_softmax' (renormalised), router_jitter_noise -> moe.input_jitter (in Mixtral it
      is the multiplicative input jitter), no biases.
    Not modelled (training-time only, no effect on eval logits): attention_dropout.
    `overrides` replace any resulting field; `moe={...}` updates the MoE section (e.g. moe={'backend': 'dense'}).
    """
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type={family!r} is not supported: accepted values are {list(FAMILIES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported: accepted values are ['silu'] (SwiGLU)")
    num_heads = hf["num_attention_heads"]
    dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    values = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or None, max_seq_len=hf["max_position_embeddings"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(hf),
        sliding_window=hf.get("sliding_window"), layout="moe",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        param_dtype=dtype if dtype in DTYPES else "float32",
    )
    moe = dict(num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
               d_hidden=hf["intermediate_size"], activation="swiglu",
               load_balance_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    if family == "phimoe":
        if moe["top_k"] != 2:
            raise ValueError(f"config.json num_experts_per_tok={moe['top_k']} is not supported for phimoe: "
                             "accepted values are [2] (transformers' sparsemixer always routes to 2 experts)")
        values.update(norm="layernorm", attention_bias=bool(hf.get("attention_bias", False)),
                      lm_head_bias=bool(hf.get("lm_head_bias", False)))
        moe.update(router="sparsemixer_v2", router_options={"jitter_eps": float(hf.get("router_jitter_noise", 0.01))},
                   input_jitter=float(hf.get("input_jitter_noise", 0.0)))
    else:
        values.update(norm="rmsnorm", attention_bias=False, lm_head_bias=False)
        moe.update(router="topk_softmax", router_options={"renormalize": True},
                   input_jitter=float(hf.get("router_jitter_noise", 0.0)))
    moe.update(overrides.pop("moe", {}))
    values.update(overrides, moe=moe)
    return ModelConfig.from_dict(values)


def moe_section(config: ModelConfig):
    """The MoEConfig of a model whose every layer is the same MoE section (what PhiMoE / Mixtral express), else
    None."""
    names = set(config.layout)
    if len(names) != 1:
        return None
    name = names.pop()
    return config.section(name) if config.kind_of(name) == "moe" else None


def family_of(config: ModelConfig) -> str:
    """'phimoe' or 'mixtral': which transformers architecture expresses `config` (ValueError if none does)."""
    problems = []
    moe = moe_section(config)
    if moe is None:
        raise ValueError(f"this ModelConfig has no transformers PhiMoE / Mixtral equivalent: layout="
                         f"{','.join(config.layout)} (both need every layer the same MoE section)")
    options = moe.router_options
    if moe.activation != "swiglu":
        problems.append(f"moe.activation={moe.activation!r} (both need 'swiglu')")
    if config.norm == "layernorm" and moe.router == "sparsemixer_v2":
        family = "phimoe"
        if moe.top_k != 2:
            problems.append(f"moe.top_k={moe.top_k} (transformers' PhiMoE sparsemixer is top-2 only)")
        if config.head_dim is not None and config.head_dim != config.d_model // config.num_heads:
            problems.append(f"head_dim={config.head_dim} (PhiMoE needs d_model // num_heads)")
    elif config.norm == "rmsnorm" and moe.router == "topk_softmax" and options.renormalize:
        family = "mixtral"
        if config.attention_bias or config.lm_head_bias:
            problems.append("attention_bias / lm_head_bias (Mixtral has no biases)")
    else:
        family = None
        problems.append(f"norm={config.norm!r} with moe.router={moe.router!r}, router_options={options} "
                        "(PhiMoE: 'layernorm' + 'sparsemixer_v2'; Mixtral: 'rmsnorm' + 'topk_softmax' renormalised)")
    if moe.output_norm:
        problems.append("moe.output_norm=True (neither has a norm on the MoE output)")
    if problems:
        raise ValueError("this ModelConfig has no transformers PhiMoE / Mixtral equivalent: " + "; ".join(problems))
    return family


def hf_config_from_model_config(config: ModelConfig, *, layout: str = "5.x", base: Mapping | None = None,
                                dtype: str | None = None) -> dict:
    """ModelConfig -> config.json dict. `base` (e.g. the imported checkpoint's config.json) supplies the fields
    grin_jax does not model (token ids, initializer_range, ...); the architecture fields are always ours.
    layout '5.x' writes rope_parameters, '4.x' the legacy rope_theta / rope_scaling."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: accepted values are {list(LAYOUTS)}")
    family = family_of(config)
    moe = moe_section(config)
    hf = dict(base or {})
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "head_dim",
                "transformers_version", "auto_map"):
        hf.pop(key, None)
    hf.update(
        architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=config.vocab_size,
        hidden_size=config.d_model, intermediate_size=moe.d_hidden, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, sliding_window=config.sliding_window,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, hidden_act="silu",
        tie_word_embeddings=config.tie_embeddings, router_aux_loss_coef=moe.load_balance_coef,
    )
    if family == "phimoe":
        hf.update(router_jitter_noise=moe.router_options.jitter_eps, input_jitter_noise=moe.input_jitter,
                  attention_bias=config.attention_bias, lm_head_bias=config.lm_head_bias)
    else:
        hf.update(router_jitter_noise=moe.input_jitter)
        if config.head_dim is not None:
            hf["head_dim"] = config.head_dim
    if layout == "5.x":
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        hf["dtype"] = dtype or config.param_dtype
    else:
        hf.update(rope_theta=config.rope_theta, rope_scaling=None, torch_dtype=dtype or config.param_dtype)
    return hf


# ------------------------------------------------------------------------------------------------- weights
def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    return "4.x" if any(".block_sparse_moe." in k for k in state) else "5.x"


def _t(a):
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def flat_from_hf_state(state: Mapping[str, np.ndarray], config: ModelConfig) -> dict:
    """HF state dict (either layout) -> grin_jax flat params. Raises on missing or unused tensors."""
    family = family_of(config)
    layout = detect_layout(state)
    c = config
    H, G, K, D, E, F = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.d_model, moe_section(c).num_experts, moe_section(c).d_hidden
    used = set()

    def get(name):
        if name not in state:
            raise ValueError(f"HF checkpoint ({family}, {layout} layout) lacks tensor {name!r}")
        used.add(name)
        return np.asarray(state[name])

    flat = {"embed.embedding": get("model.embed_tokens.weight")}
    for i in range(c.num_layers):
        hp, op = f"model.layers.{i}.", f"layers.{i}."
        a = hp + "self_attn."
        flat[op + "attn.q.kernel"] = _t(get(a + "q_proj.weight")).reshape(D, H, K)
        flat[op + "attn.k.kernel"] = _t(get(a + "k_proj.weight")).reshape(D, G, K)
        flat[op + "attn.v.kernel"] = _t(get(a + "v_proj.weight")).reshape(D, G, K)
        flat[op + "attn.o.kernel"] = _t(get(a + "o_proj.weight")).reshape(H, K, D)
        if c.attention_bias:
            flat[op + "attn.q.bias"] = get(a + "q_proj.bias").reshape(H, K)
            flat[op + "attn.k.bias"] = get(a + "k_proj.bias").reshape(G, K)
            flat[op + "attn.v.bias"] = get(a + "v_proj.bias").reshape(G, K)
            flat[op + "attn.o.bias"] = get(a + "o_proj.bias")
        for ours, theirs in (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm")):
            flat[f"{op}{ours}.scale"] = get(f"{hp}{theirs}.weight")
            if c.norm == "layernorm":
                flat[f"{op}{ours}.bias"] = get(f"{hp}{theirs}.bias")
        if layout == "5.x":
            router = hp + ("mlp.router.weight" if family == "phimoe" else "mlp.gate.weight")
            flat[op + "mlp.router"] = _t(get(router))
            gate_up = get(hp + "mlp.experts.gate_up_proj")
            if gate_up.shape != (E, 2 * F, D):
                raise ValueError(f"{hp}mlp.experts.gate_up_proj has shape {gate_up.shape}, expected {(E, 2 * F, D)}")
            flat[op + "mlp.w_gate"] = _t(gate_up[:, :F, :])
            flat[op + "mlp.w_up"] = _t(gate_up[:, F:, :])
            flat[op + "mlp.w_down"] = _t(get(hp + "mlp.experts.down_proj"))
        else:
            m = hp + "block_sparse_moe."
            flat[op + "mlp.router"] = _t(get(m + "gate.weight"))
            flat[op + "mlp.w_gate"] = np.stack([_t(get(f"{m}experts.{j}.w1.weight")) for j in range(E)])
            flat[op + "mlp.w_up"] = np.stack([_t(get(f"{m}experts.{j}.w3.weight")) for j in range(E)])
            flat[op + "mlp.w_down"] = np.stack([_t(get(f"{m}experts.{j}.w2.weight")) for j in range(E)])
    flat["final_norm.scale"] = get("model.norm.weight")
    if c.norm == "layernorm":
        flat["final_norm.bias"] = get("model.norm.bias")
    if c.tie_embeddings:
        if "lm_head.weight" in state:  # a tied checkpoint may still carry the (identical) head
            used.add("lm_head.weight")
        if c.lm_head_bias:
            flat["lm_head_bias"] = get("lm_head.bias")
    else:
        flat["lm_head.kernel"] = _t(get("lm_head.weight"))
        if c.lm_head_bias:
            flat["lm_head.bias"] = get("lm_head.bias")
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"HF checkpoint has tensors this ModelConfig does not use: {unused[:8]}"
                         f"{'...' if len(unused) > 8 else ''}")
    return flat


def hf_state_from_flat(flat: Mapping[str, np.ndarray], config: ModelConfig, *, layout: str = "5.x") -> dict:
    """grin_jax flat params -> HF state dict in `layout` ('5.x' fused or '4.x' per-expert)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: accepted values are {list(LAYOUTS)}")
    family = family_of(config)
    c = config
    H, G, K, D, E = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.d_model, moe_section(c).num_experts

    def get(name):
        if name not in flat:
            raise ValueError(f"grin_jax params lack {name!r}")
        return np.asarray(flat[name])

    state = {"model.embed_tokens.weight": get("embed.embedding")}
    for i in range(c.num_layers):
        hp, op = f"model.layers.{i}.", f"layers.{i}."
        a = hp + "self_attn."
        state[a + "q_proj.weight"] = _t(get(op + "attn.q.kernel").reshape(D, H * K))
        state[a + "k_proj.weight"] = _t(get(op + "attn.k.kernel").reshape(D, G * K))
        state[a + "v_proj.weight"] = _t(get(op + "attn.v.kernel").reshape(D, G * K))
        state[a + "o_proj.weight"] = _t(get(op + "attn.o.kernel").reshape(H * K, D))
        if c.attention_bias:
            state[a + "q_proj.bias"] = get(op + "attn.q.bias").reshape(H * K)
            state[a + "k_proj.bias"] = get(op + "attn.k.bias").reshape(G * K)
            state[a + "v_proj.bias"] = get(op + "attn.v.bias").reshape(G * K)
            state[a + "o_proj.bias"] = get(op + "attn.o.bias")
        for ours, theirs in (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm")):
            state[f"{hp}{theirs}.weight"] = get(f"{op}{ours}.scale")
            if c.norm == "layernorm":
                state[f"{hp}{theirs}.bias"] = get(f"{op}{ours}.bias")
        router, w_gate, w_up, w_down = (get(op + "mlp." + n) for n in ("router", "w_gate", "w_up", "w_down"))
        if layout == "5.x":
            state[hp + ("mlp.router.weight" if family == "phimoe" else "mlp.gate.weight")] = _t(router)
            state[hp + "mlp.experts.gate_up_proj"] = np.concatenate([_t(w_gate), _t(w_up)], axis=1)
            state[hp + "mlp.experts.down_proj"] = _t(w_down)
        else:
            m = hp + "block_sparse_moe."
            state[m + "gate.weight"] = _t(router)
            for j in range(E):
                state[f"{m}experts.{j}.w1.weight"] = _t(w_gate[j])
                state[f"{m}experts.{j}.w2.weight"] = _t(w_down[j])
                state[f"{m}experts.{j}.w3.weight"] = _t(w_up[j])
    state["model.norm.weight"] = get("final_norm.scale")
    if c.norm == "layernorm":
        state["model.norm.bias"] = get("final_norm.bias")
    if c.tie_embeddings:
        if c.lm_head_bias:
            state["lm_head.bias"] = get("lm_head_bias")
    else:
        state["lm_head.weight"] = _t(get("lm_head.kernel"))
        if c.lm_head_bias:
            state["lm_head.bias"] = get("lm_head.bias")
    return state


# ------------------------------------------------------------------------------------------------- files
def load_safetensors(path: str) -> dict:
    """The tensors of one .safetensors file, as numpy; a damaged or truncated file raises ValueError naming it
    (safetensors' own error does not say which file)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): it may be truncated or damaged; "
                         "convert or copy it again") from error


def read_safetensors_dir(path: str) -> dict:
    """All tensors of a directory of *.safetensors (sharded via model.safetensors.index.json or not), as numpy."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state = {}
    for name in files:
        state.update(load_safetensors(name))
    return state


def parse_size(size) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers)."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?B?)\s*", str(size).upper())
    if not match:
        raise ValueError(f"size={size!r} is invalid: accepted values are like '5GB', '500MB' or an integer")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    return int(float(match.group(1)) * unit[match.group(2)])


def write_safetensors_dir(path: str, state: Mapping[str, np.ndarray], *, max_shard_size=None,
                          metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write `state` as model.safetensors, or as model-0000k-of-0000n.safetensors shards of at most
    max_shard_size bytes plus model.safetensors.index.json. Returns the written file names."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    metadata = dict(metadata or {"format": "pt"})
    limit = parse_size(max_shard_size)
    shards, current, current_size = [], {}, 0
    for name in state:
        nbytes = np.asarray(state[name]).nbytes
        if limit is not None and current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = np.ascontiguousarray(state[name])
        current_size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=metadata)
        names.append(fname)
        weight_map.update({tensor: fname for tensor in shard})
    total = sum(np.asarray(v).nbytes for v in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def cast_flat(flat: Mapping[str, np.ndarray], dtype: str | None) -> dict:
    if dtype is None:
        return {k: np.asarray(v) for k, v in flat.items()}
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: accepted values are {list(DTYPES)}")
    import ml_dtypes  # numpy has no bfloat16

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: np.asarray(v).astype(np_dtype) for k, v in flat.items()}


def read_hf_checkpoint(path: str, **overrides):
    """A transformers checkpoint directory (config.json + safetensors; either layout) ->
    (ModelConfig, flat grin_jax params as numpy, the config.json dict)."""
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    config = model_config_from_hf(hf_config, **overrides)
    flat = flat_from_hf_state(read_safetensors_dir(path), config)
    return config, flat, hf_config


def write_hf_checkpoint(path: str, config: ModelConfig, flat: Mapping[str, np.ndarray], *, layout: str = "5.x",
                        base_hf_config: Mapping | None = None, dtype: str | None = None, max_shard_size=None) -> dict:
    """grin_jax flat params -> a transformers checkpoint directory (config.json + safetensors in `layout`).
    dtype: cast the tensors (default: keep them as they are). Returns the written config.json dict."""
    state = hf_state_from_flat(cast_flat(flat, dtype), config, layout=layout)
    stored = dtype or str(np.asarray(next(iter(flat.values()))).dtype)
    hf_config = hf_config_from_model_config(config, layout=layout, base=base_hf_config,
                                            dtype=stored if stored in DTYPES else None)
    write_safetensors_dir(path, state, max_shard_size=max_shard_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return hf_config
