"""`ModelConfig`: the frozen, validated description of a decoder-only (MoE) language model.

Every mistake raises `ValueError` naming the field, the value and what would be accepted, when the config is
constructed (before anything is traced or compiled).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import experts as _experts
from grin_jax.moe import routing as _routing
from grin_jax.moe.layer import PARALLEL_STRATEGIES, MoEConfig

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
    MoE (see grin_jax.moe.MoEConfig): num_experts, top_k, d_expert (expert width; None = 16, 2, 1024 unless
      fine-grained, below), activation, router ('sparsemixer_v2' | 'topk_softmax' | 'expert_choice'), jitter_eps (SparseMixer-v2 mask eps), renormalize (top-k softmax),
      input_jitter (multiplicative input jitter in training, applied once), moe_backend, capacity_factor,
      load_balance_groups.
      router='expert_choice': Krajewski et al.'s expert choice grouped by position (moe.expert_choice): each
      expert takes the top C = ceil(capacity_factor * B * top_k / num_experts) tokens of the batch at every
      position; input_jitter, jitter_eps, renormalize, moe_backend and load_balance_groups do not apply.
      moe_output_norm: a norm of kind `norm` on the MoE output before the residual add ("crucial for G > 1").
      moe_parallel: the MoE layer's strategy on a mesh of more than one device (grin_jax.sharding; token routers):
      'allgather' (dropless, default), 'alltoall' (capacity_factor, drops), 'ragged_alltoall' (dropless, GPU/TPU).
      load_balance_groups 1 = GRIN's global balance (over all data shards); = the number of data shards (mesh.data x
      mesh.expert) = per-shard ("local") balance; the numbers are the same on any mesh.
    Fine-grained MoE (Krajewski et al., REFERENCE §2): expansion_rate E (None = not fine-grained) and
      granularity G (default 1). When expansion_rate is set, d_ff is the dense FFN width the experts are cut
      from (None = 4 * d_model) and num_experts = E*G, d_expert = d_ff/G, top_k = G are DERIVED: leave them
      None (or give exactly the derived values); any other value is a ValueError naming the field, as is a G
      that does not divide d_ff or E*G that is not an integer. Active expert parameters then do not change with G.
      With activation 'gelu'/'relu' (plain 2-matrix experts) and attention 4*d^2, the non-embedding parameters
      without router and norms are d^2 (8E + 4) per block (the law's N). granularity without expansion_rate must
      be 1 (it is only a label then, e.g. for dense baselines in a sweep). `replace` re-derives the fields when
      a fine-grained input (expansion_rate, granularity, d_ff, d_model) changes.
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
    num_experts: int | None = None
    top_k: int | None = None
    d_expert: int | None = None
    d_ff: int | None = None
    granularity: int = 1
    expansion_rate: float | None = None
    moe_output_norm: bool = False
    activation: str = "swiglu"
    router: str = "sparsemixer_v2"
    jitter_eps: float = 0.01
    renormalize: bool = True
    input_jitter: float = 0.0
    moe_backend: str = "auto"
    capacity_factor: float = 1.25
    load_balance_groups: int = 1
    moe_parallel: str = "allgather"
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

        self._resolve_fine_grained()
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "max_seq_len",
                     "moe_every", "num_experts", "top_k", "d_expert", "load_balance_groups", "granularity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "integers >= 1")
        for name in ("head_dim", "sliding_window", "d_ff"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "None or integers >= 1")
        for name in ("attention_bias", "renormalize", "tie_embeddings", "lm_head_bias", "moe_output_norm"):
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
        if self.router not in _routing.ROUTERS and self.router != EXPERT_CHOICE:
            fail("router", sorted(_routing.ROUTERS) + [EXPERT_CHOICE])
        if self.moe_backend not in _dispatch.BACKENDS:
            fail("moe_backend", list(_dispatch.BACKENDS))
        if self.moe_parallel not in PARALLEL_STRATEGIES:
            fail("moe_parallel", list(PARALLEL_STRATEGIES))
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

    def _resolve_fine_grained(self) -> None:
        """Derive num_experts, d_expert, top_k from (expansion_rate, granularity, d_ff) or fill the defaults.

        Precedence: the fine-grained fields win; an explicit num_experts / d_expert / top_k is accepted only when
        it equals the derived value (so to_dict -> from_dict round-trips), anything else is a conflict."""
        g, e = self.granularity, self.expansion_rate
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"ModelConfig.granularity={g!r} is invalid: accepted values are integers >= 1")
        if e is None:
            if g != 1:
                raise ValueError(f"ModelConfig.granularity={g!r} needs expansion_rate: set expansion_rate (E) to "
                                 "derive num_experts = E*G, d_expert = d_ff/G, top_k = G, or use granularity=1")
            for name, default in LEGACY_MOE_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
            return
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise ValueError(f"ModelConfig.expansion_rate={e!r} is invalid: accepted values are None or numbers > 0")
        d_ff = self.d_ff if self.d_ff is not None else 4 * self.d_model
        if not isinstance(d_ff, int) or isinstance(d_ff, bool) or d_ff < 1:
            raise ValueError(f"ModelConfig.d_ff={self.d_ff!r} is invalid: accepted values are None or integers >= 1")
        if d_ff % g:
            divisors = [k for k in range(1, d_ff + 1) if d_ff % k == 0 and k <= 256]
            raise ValueError(f"ModelConfig.granularity={g} does not divide the dense FFN width d_ff={d_ff}"
                             f"{' (4 * d_model)' if self.d_ff is None else ''}: accepted values are divisors of "
                             f"d_ff, e.g. {divisors}")
        num_experts = e * g
        if not float(num_experts).is_integer():
            raise ValueError(f"ModelConfig.expansion_rate={e!r} is invalid with granularity={g}: the number of "
                             f"experts expansion_rate*granularity={num_experts!r} must be an integer")
        derived = {"num_experts": int(num_experts), "d_expert": d_ff // g, "top_k": g}
        for name, value in derived.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"ModelConfig.{name}={given!r} conflicts with the fine-grained parametrisation "
                                 f"(expansion_rate={e}, granularity={g}, d_ff={d_ff}) which derives {name}={value}: "
                                 f"leave {name} None (or set it to {value}), or unset expansion_rate")
            object.__setattr__(self, name, value)

    @property
    def is_fine_grained(self) -> bool:
        return self.expansion_rate is not None

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
                         load_balance_groups=self.load_balance_groups, parallel=self.moe_parallel)

    def dense_equivalent(self) -> "ModelConfig":
        """The dense baseline with the same active parameters: every FFN dense, d_ff = top_k * d_expert
        (equal to the active expert parameters; the MoE's router, d_model * num_experts per layer, is the only
        difference)."""
        return dataclasses.replace(self, ffn="dense", d_ff=self.top_k * self.d_expert)

    def replace(self, **changes) -> "ModelConfig":
        """dataclasses.replace; for a fine-grained result the derived fields (num_experts, d_expert, top_k) are
        re-derived unless given explicitly, so e.g. `config.replace(granularity=4)` works."""
        fine_inputs = ("expansion_rate", "granularity", "d_ff", "d_model")
        if changes.get("expansion_rate", self.expansion_rate) is not None and any(k in changes for k in fine_inputs):
            for name in LEGACY_MOE_DEFAULTS:
                changes.setdefault(name, None)
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
EXPERT_CHOICE = "expert_choice"
LEGACY_MOE_DEFAULTS = {"num_experts": 16, "top_k": 2, "d_expert": 1024}  # when not fine-grained and not given


def model_config_from(config_model) -> ModelConfig:
    """ModelConfig from an ml_collections ConfigDict (the `model` field of a config file) or a plain mapping."""
    if hasattr(config_model, "to_dict"):
        config_model = config_model.to_dict()
    return ModelConfig.from_dict(dict(config_model))
