"""`ModelConfig`: the frozen, validated description of a decoder-only language model.

The backbone (embedding, attention, norms, head, dtypes) is declared here; each FFN kind declares its own settings
in its own config dataclass (grin_jax.ffn: `moe` -> moe.layer.MoEConfig, `dense` -> ffn.dense.DenseConfig, ...),
and the model config holds one section per kind used plus a per-layer `layout`:

    model.layout = 'moe'              # every layer the section 'moe'
    model.layout = 'dense,moe'        # a pattern repeated over the layers (its length must divide num_layers)
    model.layout = 'moe,moe,peer,moe' # or one entry per layer
    model.moe = {...}                 # a section: its kind is its 'kind' key, else its name
    model.moe_ds = {'kind': 'moe', 'router': 'ds', ...}   # a second MoE section with other settings

Every mistake raises `ValueError` naming the key, the value and what would be accepted, when the config is
constructed (before anything is traced or compiled).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from grin_jax import ffn as _ffn
from grin_jax.nn.block import CHECKPOINT_NAMES, REMAT_POLICIES
from grin_jax.nn.moa import MoAConfig

NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_FIELDS = ("param_dtype", "dtype", "activation_dtype")
LAYER_LOOP_FIELDS = ("scan_layers", "remat", "remat_names")  # how the layers run, not what they compute


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder LM: embed -> num_layers x pre-LN [attention, FFN of the layer's section] -> final norm -> LM head.

    Sizes: vocab_size, d_model, num_layers, num_heads (query heads), num_kv_heads (GQA; must divide num_heads),
      head_dim (None = d_model // num_heads), max_seq_len (context; RoPE positions and KV caches up to it).
    Attention: rope_theta; sliding_window (None = full causal; W = each query sees W keys including itself,
      transformers 5.x semantics); attention_bias (q/k/v/o projections with bias); moa (None = grouped-query
      attention in every layer; a mapping, the `model.moa` section = DS-MoE's mixture of attention heads in every
      layer, nn/moa.py MoAConfig).
    Norm: 'layernorm' (weight + bias, GRIN/PhiMoE) or 'rmsnorm' (Mixtral); norm_eps.
    FFN: layout (above) and `sections`, a tuple of (section name, kind config) pairs (built by from_dict from the
      mapping-valued keys; construct directly with `ModelConfig.make(..., moe={...})`).
    Head: tie_embeddings (LM head = embedding^T), lm_head_bias.
    Dtypes: param_dtype (storage), dtype (matmul compute), activation_dtype (residual stream). Routers and
      attention softmax run in float32 (the MoE router in moe.router_dtype, default float32); logits are float32
      (docs/scale_out.md#mixed-precision).
    init_std: embedding init std (other weights: fan-in scaled normal).
    Layer loop (models/lm.py; the numbers are the same either way): scan_layers (run the layers as a lax.scan over
      repeats of the layout's shortest period, so compile time does not grow with depth); remat (what the backward
      pass keeps of each layer: 'none' everything; 'full' only the layer's input, recomputing the rest;
      'save_matmuls' the outputs of the weight matmuls; 'save_names' only the values tagged with remat_names,
      from nn/block.py's CHECKPOINT_NAMES).
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
    moa: Any = None
    layout: Any = "moe"
    sections: tuple = ()
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    activation_dtype: str = "float32"
    init_std: float = 0.02
    scan_layers: bool = False
    remat: str = "none"
    remat_names: tuple = ()

    def __post_init__(self):
        def fail(name, accepted):
            raise ValueError(f"model.{name}={getattr(self, name)!r} is invalid: accepted values are {accepted}")

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "integers >= 1")
        for name in ("head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "None or integers >= 1")
        for name in ("attention_bias", "tie_embeddings", "lm_head_bias", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.remat not in REMAT_POLICIES:
            fail("remat", list(REMAT_POLICIES))
        if isinstance(self.remat_names, str) or not all(isinstance(n, str) for n in self.remat_names):
            fail("remat_names", f"a tuple of the names {list(CHECKPOINT_NAMES)}")
        object.__setattr__(self, "remat_names", tuple(self.remat_names))
        unknown = [n for n in self.remat_names if n not in CHECKPOINT_NAMES]
        if unknown or (self.remat == "save_names") != bool(self.remat_names):
            fail("remat_names", f"a non-empty tuple of the names {list(CHECKPOINT_NAMES)} with remat='save_names', "
                                "else ()")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}: "
                             "accepted values of num_kv_heads are the divisors of num_heads "
                             f"{[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                             "set head_dim explicitly or choose d_model a multiple of num_heads")
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim={self.resolved_head_dim} is invalid: RoPE needs an even head dim "
                             "(accepted values: even integers >= 2)")
        if self.sliding_window is not None and self.sliding_window > self.max_seq_len:
            fail("sliding_window", f"None or 1..max_seq_len={self.max_seq_len}")
        if self.norm not in NORMS:
            fail("norm", list(NORMS))
        for name in DTYPE_FIELDS:
            if getattr(self, name) not in DTYPES:
                fail(name, list(DTYPES))
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                fail(name, "finite numbers > 0")
        if self.moa is not None and not isinstance(self.moa, MoAConfig):
            if not isinstance(self.moa, Mapping) and not hasattr(self.moa, "to_dict"):
                fail("moa", "None or a mapping of MoAConfig keys")
            values = dict(self.moa.to_dict() if hasattr(self.moa, "to_dict") else self.moa)
            object.__setattr__(self, "moa", MoAConfig.from_section(values, num_heads=self.num_heads,
                                                                   num_kv_heads=self.num_kv_heads))
        object.__setattr__(self, "sections", self._resolve_sections(self.sections))
        object.__setattr__(self, "layout", self._resolve_layout(self.layout))

    def _resolve_sections(self, sections) -> tuple:
        pairs = tuple(sections.items()) if isinstance(sections, Mapping) else tuple(sections)
        resolved = []
        for name, value in pairs:
            if not isinstance(value, Mapping) and hasattr(value, "to_section"):
                resolved.append((name, value))
                continue
            values = dict(value.to_dict() if hasattr(value, "to_dict") else value)
            kind = values.pop("kind", name)
            try:
                kind_class = _ffn.get_ffn(kind)
            except ValueError as error:
                raise ValueError(f"model.{name}: {error} (a section's kind is its 'kind' key, else its name)") from None
            resolved.append((name, kind_class.Config.from_section(values, d_model=self.d_model)))
        return tuple(sorted(resolved, key=lambda pair: pair[0]))  # order-free: equal configs compare equal

    def _resolve_layout(self, layout) -> tuple:
        entries = [s.strip() for s in layout.split(",")] if isinstance(layout, str) else list(layout)
        known = [name for name, _ in self.sections]
        for entry in dict.fromkeys(entries):  # a kind's name without a section: that kind with its defaults
            if entry not in known and entry in _ffn.known_kinds():
                object.__setattr__(self, "sections", self._resolve_sections(self.sections + ((entry, {}),)))
                known.append(entry)
        for entry in entries:
            if entry not in known:
                raise ValueError(f"model.layout={layout!r} names {entry!r}, which is not a section of the model "
                                 f"config: accepted names are its FFN sections {known}")
        if not entries or self.num_layers % len(entries):
            raise ValueError(f"model.layout={layout!r} has {len(entries)} entries: accepted are one entry per layer "
                             f"or a pattern whose length divides num_layers={self.num_layers}")
        return tuple(entries) * (self.num_layers // len(entries))

    # ----------------------------------------------------------------------------------------------- derived
    @classmethod
    def make(cls, **values) -> "ModelConfig":
        """ModelConfig from keyword arguments with FFN sections given as mappings, e.g.
        `ModelConfig.make(vocab_size=.., ..., layout='moe', moe={'num_experts': 8})` (= from_dict)."""
        return cls.from_dict(values)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def section(self, name: str):
        """The config of FFN section `name`."""
        for section_name, config in self.sections:
            if section_name == name:
                return config
        raise KeyError(f"model has no FFN section {name!r}: its sections are {[n for n, _ in self.sections]}")

    def kind_of(self, name: str) -> str:
        config = self.section(name)
        return next(kind for kind, cls in _ffn.FFN_KINDS.items() if isinstance(config, cls.Config))

    def layer_config(self, layer: int):
        """(section name, kind name, kind config) of `layer`."""
        name = self.layout[layer]
        return name, self.kind_of(name), self.section(name)

    def layers_of(self, name: str) -> tuple[int, ...]:
        return tuple(i for i, entry in enumerate(self.layout) if entry == name)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; a mapping value for an FFN section updates that section's keys (fine-grained
        shape fields re-derive, e.g. `config.replace(moe={'granularity': 4})` or `config.replace(d_model=128)`)."""
        values = self.to_dict()
        for key, value in changes.items():
            if isinstance(values.get(key), dict) and isinstance(value, Mapping):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        return ModelConfig.from_dict(values)

    def to_dict(self) -> dict:
        """Flat mapping: backbone fields, 'layout' (its shortest repeating pattern) and one dict per section."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        if self.moa is not None:
            values["moa"] = self.moa.to_section()
        period = next(p for p in range(1, len(self.layout) + 1)
                      if len(self.layout) % p == 0 and self.layout == self.layout[:p] * (len(self.layout) // p))
        values["layout"] = ",".join(self.layout[:period])  # the shortest pattern
        for name, config in self.sections:
            section = config.to_section()
            kind = self.kind_of(name)
            if kind != name:
                section = {"kind": kind, **section}
            values[name] = section
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """From a flat mapping (a config file's `model` section): backbone fields plus one mapping per FFN
        section. Unknown scalar keys raise naming the accepted fields."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        backbone, sections = {}, {}
        for key, value in dict(values).items():
            if key == "moa":
                backbone[key] = value
            elif isinstance(value, Mapping) or hasattr(value, "to_dict"):
                sections[key] = value
            elif key in fields:
                backbone[key] = value
            else:
                raise ValueError(f"model.{key} is unknown: accepted keys are {sorted(fields)} and FFN sections "
                                 f"(mappings) of the kinds {sorted(_ffn.FFN_KINDS) or ['dense', 'moe']}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in backbone]
        if required:
            raise ValueError(f"model: missing required field(s) {required}")
        return cls(**backbone, sections=tuple(sections.items()))


def model_config_from(config_model) -> ModelConfig:
    """ModelConfig from an ml_collections ConfigDict (the `model` field of a config file) or a plain mapping."""
    if hasattr(config_model, "to_dict"):
        config_model = config_model.to_dict()
    return ModelConfig.from_dict(dict(config_model))
