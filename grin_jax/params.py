"""Parameter accounting: total and active (per token) parameters of any ModelConfig, computed abstractly
(nnx.eval_shape: shapes only, nothing is allocated, so a 42B model counts in a second on a laptop).

    python -m grin_jax.params --config=configs/grin_moe_16x3_8b.py
    python -m grin_jax.params --config=configs/grin_moe_16x3_8b.py:dense --config.model.num_layers=16

Active parameters per token = all parameters except those a token does not visit, as each FFN kind says
(grin_jax.ffn `param_counts`): in an MoE layer only top_k of num_experts experts run (the router, attention, norms,
embedding and LM head always count). Only nnx.Param are parameters: running statistics (nnx.BatchStat, e.g. PEER's
query BatchNorm mean and variance) are not counted.
"""

from __future__ import annotations

import math
import re
import sys

from grin_jax.models.config import ModelConfig, model_config_from

COMPONENTS = ("embedding", "lm_head", "attention", "norms", "router", "experts", "dense_ffn")


def _backbone_component(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("final_norm.") or re.search(r"^layers\.\d+\.(input_norm|post_attn_norm)\.", name):
        return "norms"
    if re.search(r"^layers\.\d+\.attn\.", name):
        return "attention"
    raise ValueError(f"unclassified parameter {name!r}")


def count_params(config: ModelConfig) -> dict:
    """{'total', 'active', 'non_embedding', 'active_non_embedding', and per component the total and
    '<component>_active'} for `config`. The backbone is counted from abstract shapes (nothing allocated); each
    layer's FFN by its kind's `param_counts` (the split into components and what is active per token), checked
    against the layer's abstract shapes (what the kind does not claim, e.g. an output norm, counts as 'norms')."""
    from grin_jax import ffn as _ffn
    from grin_jax.models.lm import abstract_init, flatten_params, split_variables

    abstract, _ = split_variables(abstract_init(config)[1])  # nnx.Param only: running statistics are not parameters
    totals, actives = {}, {}

    def add(component, total, active):
        totals[component] = totals.get(component, 0) + int(total)
        actives[component] = actives.get(component, 0) + int(active)

    ffn_sizes = {}
    for name, spec in flatten_params(abstract).items():
        size = math.prod(int(d) for d in spec.shape)
        match = re.match(r"layers\.(\d+)\.mlp\.", name)
        if match:
            ffn_sizes[int(match.group(1))] = ffn_sizes.get(int(match.group(1)), 0) + size
        else:
            add(_backbone_component(name), size, size)
    for layer in range(config.num_layers):
        section, kind, ffn_config = config.layer_config(layer)
        claimed = _ffn.get_ffn(kind).param_counts(ffn_config)
        for component, (total, active) in claimed.items():
            add(component, total, active)
        rest = ffn_sizes.get(layer, 0) - sum(total for total, _ in claimed.values())
        if rest < 0:
            raise ValueError(f"FFN kind {kind!r} (section {section!r}) claims more parameters than layer {layer} has")
        add("norms", rest, rest)
    result = {c: totals.get(c, 0) for c in dict.fromkeys(COMPONENTS + tuple(totals))}
    result.update({c + "_active": actives.get(c, 0) for c in list(result)})
    names = [c for c in result if not c.endswith("_active")]
    result["total"] = sum(result[c] for c in names)
    result["active"] = sum(result[c + "_active"] for c in names)
    embedding = result["embedding"] + result["lm_head"]
    result["non_embedding"] = result["total"] - embedding
    result["active_non_embedding"] = result["active"] - embedding
    return result


def format_counts(counts: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'':24s}{'total':>20s}{'active / token':>20s}")
    for comp in [c for c in counts if c + "_active" in counts]:
        if counts[comp]:
            lines.append(f"  {comp:22s}{counts[comp]:>20,d}{counts[comp + '_active']:>20,d}")
    lines.append(f"  {'non-embedding':22s}{counts['non_embedding']:>20,d}{counts['active_non_embedding']:>20,d}")
    lines.append(f"  {'all':22s}{counts['total']:>20,d}{counts['active']:>20,d}")
    lines.append(f"total parameters: {counts['total'] / 1e9:.3f}B   active per token: {counts['active'] / 1e9:.3f}B")
    return "\n".join(lines)


def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)  # a user error: one line (GRIN_JAX_DEBUG=1 for the traceback)


def _main(argv=None) -> int:
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
    title += f", layout {','.join(config.layout)}"
    print(format_counts(count_params(config), title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
