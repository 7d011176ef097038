"""`ModelConfig`: the frozen, validated description of a decoder-only (MoE) language model.

Every mistake raises `ValueError` naming the field, the value and what would be accepted, when the config is
constructed (before anything is traced or compiled).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import experts as _experts
from grin_jax.moe import routing as _routing
from grin_jax.moe.layer import MoEConfig

NORMS = ("layernorm", "rmsnorm")
FFNS = ("moe", "dense")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder LM: embed -> num_layers x pre-LN [attention, FFN] -> final norm -> LM head.

    Sizes: vocab_size, d_model, num_layers, num_heads (query heads), num_kv_heads (GQA; must divide num_heads),
      head_dim (None = d_model // num_heads), max_seq_len (context; RoPE positions and KV caches up to it).
    Attention: rope_theta; sliding_window (None = full causal; W = each query sees W keys including itself,
      transformers 5.x semantics); attention_bias (q/k/v/o projections with bias).
    Norm: 'layernorm' (weight + bias, GRIN/PhiMoE) or 'rmsnorm' (Mixtral); norm_eps.
    FFN: ffn='moe' (MoE every `moe_every`-th layer: layer i is MoE when (i + 1) % moe_every == 0, dense FFN of
      width d_ff in between) or 'dense' (every layer a dense FFN of width d_ff: the dense baseline).
      d_ff None = top_k * d_expert, which gives the dense FFN the active expert parameters of the MoE layer.
    MoE (see grin_jax.moe.MoEConfig): num_experts, top_k, d_expert (expert width), activation, router
      ('sparsemixer_v2' | 'topk_softmax'), jitter_eps (SparseMixer-v2 mask eps), renormalize (top-k softmax),
      input_jitter (multiplicative input jitter in training, applied once), moe_backend, capacity_factor,
      load_balance_groups.
    Aux losses: load_balance_coef, z_loss_coef: aux['aux_loss'] = lb_coef * mean_l(LB_l) + z_coef * mean_l(Z_l).
    Head: tie_embeddings (LM head = embedding^T), lm_head_bias.
    Dtypes: param_dtype (storage), dtype (matmul compute), activation_dtype (residual stream). Router and
      attention softmax always run in float32; logits are returned in float32.
    init_std: embedding init std (other weights: fan-in scaled normal).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_seq_len: int = 4096
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    attention_bias: bool = False
    ffn: str = "moe"
    moe_every: int = 1
    num_experts: int = 16
    top_k: int = 2
    d_expert: int = 1024
    d_ff: int | None = None
    activation: str = "swiglu"
    router: str = "sparsemixer_v2"
    jitter_eps: float = 0.01
    renormalize: bool = True
    input_jitter: float = 0.0
    moe_backend: str = "tiled"
    capacity_factor: float = 1.25
    load_balance_groups: int = 1
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    activation_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        def fail(name, accepted):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: accepted values are {accepted}")

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "max_seq_len",
                     "moe_every", "num_experts", "top_k", "d_expert", "load_balance_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "integers >= 1")
        for name in ("head_dim", "sliding_window", "d_ff"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "None or integers >= 1")
        for name in ("attention_bias", "renormalize", "tie_embeddings", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}: accepted values of num_kv_heads are the divisors "
                             f"of num_heads {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                             "set head_dim explicitly or choose d_model a multiple of num_heads")
        if self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.resolved_head_dim} is invalid: RoPE needs an even head "
                             "dim (accepted values: even integers >= 2)")
        if self.sliding_window is not None and self.sliding_window > self.max_seq_len:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} is larger than the context "
                             f"max_seq_len={self.max_seq_len}: accepted values are None or 1..{self.max_seq_len}")
        if self.norm not in NORMS:
            fail("norm", list(NORMS))
        if self.ffn not in FFNS:
            fail("ffn", list(FFNS))
        if self.activation not in _experts.ACTIVATIONS:
            fail("activation", sorted(_experts.ACTIVATIONS))
        if self.router not in _routing.ROUTERS:
            fail("router", sorted(_routing.ROUTERS))
        if self.moe_backend not in _dispatch.BACKENDS:
            fail("moe_backend", list(_dispatch.BACKENDS))
        if self.top_k > self.num_experts:
            fail("top_k", f"1..num_experts={self.num_experts}")
        for name in DTYPE_FIELDS:
            if getattr(self, name) not in DTYPES:
                fail(name, list(DTYPES))
        for name in ("norm_eps", "rope_theta", "capacity_factor", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, "numbers > 0")
        for name in ("jitter_eps", "load_balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                fail(name, "numbers >= 0")
        if not isinstance(self.input_jitter, (int, float)) or not 0 <= self.input_jitter < 1:
            fail("input_jitter", "numbers in [0, 1)")
        if self.ffn == "moe" and self.moe_every > self.num_layers:
            fail("moe_every", f"1..num_layers={self.num_layers} (no layer would be MoE)")

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else self.top_k * self.d_expert

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and (layer + 1) % self.moe_every == 0

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def moe_config(self) -> MoEConfig:
        return MoEConfig(num_experts=self.num_experts, top_k=self.top_k, d_model=self.d_model,
                         d_hidden=self.d_expert, router=self.router, jitter_eps=float(self.jitter_eps),
                         renormalize=self.renormalize, input_jitter=float(self.input_jitter),
                         activation=self.activation, backend=self.moe_backend,
                         capacity_factor=float(self.capacity_factor), router_dtype="float32",
                         load_balance_groups=self.load_balance_groups)

    def dense_equivalent(self) -> "ModelConfig":
        """The dense baseline with the same active parameters: every FFN dense, d_ff = top_k * d_expert
        (equal to the active expert parameters; the MoE's router, d_model * num_experts per layer, is the only
        difference)."""
        return dataclasses.replace(self, ffn="dense", d_ff=self.top_k * self.d_expert)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}: accepted fields are {sorted(fields)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in values]
        if required:
            raise ValueError(f"ModelConfig: missing required field(s) {required}")
        return cls(**dict(values))


DTYPE_FIELDS = ("param_dtype", "dtype", "activation_dtype")


def model_config_from(config_model) -> ModelConfig:
    """ModelConfig from an ml_collections ConfigDict (the `model` field of a config file) or a plain mapping."""
    if hasattr(config_model, "to_dict"):
        config_model = config_model.to_dict()
    return ModelConfig.from_dict(dict(config_model))
