"""Parameter accounting: total and active (per token) parameters of any ModelConfig, computed abstractly
(nnx.eval_shape: shapes only, nothing is allocated, so a 42B model counts in a second on a laptop).

    python -m grin_jax.params --config=configs/grin_moe_16x3_8b.py
    python -m grin_jax.params --config=configs/grin_moe_16x3_8b.py:dense --config.model.num_layers=16

Active parameters per token = all parameters except the experts a token does not visit: in every MoE layer
only top_k of num_experts experts run (the router, attention, norms, embedding and LM head always count).
"""

from __future__ import annotations

import re
import sys

from grin_jax.models.config import ModelConfig, model_config_from

COMPONENTS = ("embedding", "lm_head", "attention", "norms", "router", "experts", "dense_ffn")


def _component(name: str, config: ModelConfig) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("final_norm.") or re.search(r"\.(input_norm|post_attn_norm|output_norm)\.", name):
        return "norms"
    if ".attn." in name:
        return "attention"
    match = re.match(r"layers\.(\d+)\.mlp\.(\w+)$", name)
    if match:
        if not config.is_moe_layer(int(match.group(1))):
            return "dense_ffn"
        return "router" if match.group(2) == "router" else "experts"
    raise ValueError(f"unclassified parameter {name!r}")


def count_params(config: ModelConfig) -> dict:
    """{'total', 'active', 'non_embedding', 'active_non_embedding', and per component (COMPONENTS) the total
    and '<component>_active'} for `config`, from abstract shapes only."""
    from grin_jax.models.lm import abstract_init, flatten_params

    _, abstract = abstract_init(config)
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, spec in flatten_params(abstract).items():
        size = 1
        for dim in spec.shape:
            size *= int(dim)
        counts[_component(name, config)] += size
    result = dict(counts)
    for comp in COMPONENTS:
        active = counts[comp]
        if comp == "experts":
            active = counts[comp] * config.top_k // config.num_experts
        result[comp + "_active"] = active
    result["total"] = sum(counts.values())
    result["active"] = sum(result[c + "_active"] for c in COMPONENTS)
    embedding = counts["embedding"] + counts["lm_head"]
    result["non_embedding"] = result["total"] - embedding
    result["active_non_embedding"] = result["active"] - embedding
    return result


def format_counts(counts: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'':24s}{'total':>20s}{'active / token':>20s}")
    for comp in COMPONENTS:
        if counts[comp]:
            lines.append(f"  {comp:22s}{counts[comp]:>20,d}{counts[comp + '_active']:>20,d}")
    lines.append(f"  {'non-embedding':22s}{counts['non_embedding']:>20,d}{counts['active_non_embedding']:>20,d}")
    lines.append(f"  {'all':22s}{counts['total']:>20,d}{counts['active']:>20,d}")
    lines.append(f"total parameters: {counts['total'] / 1e9:.3f}B   active per token: {counts['active'] / 1e9:.3f}B")
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flags_ = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (get_config(arg)).",
                                    flag_values=flags_, lock_config=True)
    argv = list(sys.argv if argv is None else argv)
    flags_(argv)
    if flags_.config is None:
        print("usage: python -m grin_jax.params --config=configs/<file>.py[:variant] [--config.model.FIELD=VALUE]",
              file=sys.stderr)
        return 2
    config = model_config_from(flags_.config.model)
    title = f"{flags_['config'].config_filename}: {config.num_layers} layers, d_model {config.d_model}"
    if config.ffn == "moe":
        title += f", {config.num_experts} experts top-{config.top_k} (MoE layers: {len(config.moe_layer_ids)})"
    print(format_counts(count_params(config), title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
