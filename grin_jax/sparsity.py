"""DS-MoE sparse inference on a trained checkpoint: the sparsity settings, and the grid of validation loss against
active fraction (docs/ds_moe.md#evaluating-sparsity).

    python -m grin_jax.sparsity --workdir=workdirs/ds_moe_tiny [--max_batches=0] [--step=N] [--out=DIR]
        [--thresholds=0.5,1,2,4]

evaluates the checkpoint in the dense mode and then, for the MLP layers (attention dense) and the attention layers
(MLP dense) separately, at top-K for K in {N, N/2, N/4, N/8, 1}, at each threshold and at threshold-top-K for each
threshold; writes DIR/grid.csv, grid.json, grid.md and loss_vs_active.png (default DIR: WORKDIR/sparsity). The MLP
layers are the FFN sections of kind `ds_moe`, the attention layers the model's `moa` experts (nn/moa.py). A model
with neither gets its one row (what it was trained with), so baselines are scored on the same batches.

A setting is a string, the same everywhere (this grid, `python -m grin_jax.sample --mlp_sparsity=...`):
    'dense'             every expert (the training computation)
    'top_k:K'           the K largest router scores S_i, weights S_i (not renormalised)
    'threshold:EPS'     expert i when N * S_i > EPS, computed with N slots (exact on every token)
    'threshold_top_k:EPS'  top-K with K the mean over the evaluation set of the count of experts over the threshold
                        (the paper's threshold-top-K): two passes, so only in this grid, which measures K first.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

DEFAULT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
LAYER_TYPES = ("mlp", "attention")


def parse_setting(text: str, *, what: str = "setting") -> tuple[str, float | int | None]:
    """'dense' | 'top_k:K' | 'threshold:EPS' | 'threshold_top_k:EPS' -> (mode, value)."""
    accepted = "'dense', 'top_k:K' (integer K >= 1), 'threshold:EPS' or 'threshold_top_k:EPS' (number EPS >= 0)"
    mode, _, value = str(text).partition(":")
    try:
        if mode == "dense" and not value:
            return "dense", None
        if mode == "top_k":
            k = int(value)
            if k >= 1 and str(k) == value.strip():
                return mode, k
        elif mode in ("threshold", "threshold_top_k"):
            eps = float(value)
            if 0 <= eps < float("inf"):
                return mode, eps
    except ValueError:
        pass
    raise ValueError(f"{what}={text!r} is invalid: accepted values are {accepted}")


def layer_sections(model_config) -> dict:
    """{'mlp': [names of the FFN sections of kind ds_moe that some layer uses], 'attention': ['moa'] or []}."""
    used = dict.fromkeys(model_config.layout)
    return {"mlp": [name for name in used if model_config.kind_of(name) == "ds_moe"],
            "attention": ["moa"] if model_config.moa is not None else []}


def _num_experts(model_config, layer_type: str) -> int:
    if layer_type == "attention":
        return model_config.moa.num_experts
    counts = {model_config.section(name).num_experts for name in layer_sections(model_config)["mlp"]}
    if len(counts) != 1:
        raise ValueError(f"the ds_moe sections have different expert counts {sorted(counts)}: one MLP setting "
                         "cannot apply to all of them")
    return counts.pop()


def _section_values(mode: str, value, num_experts: int) -> dict:
    if mode == "dense":
        return {"inference": "dense"}
    if mode == "top_k":
        if value > num_experts:
            raise ValueError(f"top_k:{value} is invalid for {num_experts} experts: accepted K are 1..{num_experts}")
        return {"inference": "top_k", "inference_top_k": value}
    if mode == "threshold":
        return {"inference": "threshold", "inference_top_k": num_experts, "inference_threshold": value}
    raise ValueError(f"{mode}:{value} needs the count of experts over the threshold measured on data: use the grid "
                     "(python -m grin_jax.sparsity), which measures it, or a 'top_k:K' setting")


def with_sparsity(model_config, *, mlp: str = "dense", attention: str = "dense"):
    """The ModelConfig with the MLP layers' (every ds_moe section) and the attention experts' inference settings
    replaced (module docstring; threshold_top_k is resolved by the grid, not here). A setting other than 'dense'
    for a layer type the model does not have raises."""
    sections = layer_sections(model_config)
    changes = {}
    for layer_type, text in (("mlp", mlp), ("attention", attention)):
        mode, value = parse_setting(text, what=f"{layer_type} sparsity")
        if not sections[layer_type]:
            if mode != "dense":
                raise ValueError(f"{layer_type} sparsity={text!r}: the model has no "
                                 f"{'ds_moe FFN sections' if layer_type == 'mlp' else 'attention experts (model.moa)'}")
            continue
        values = _section_values(mode, value, _num_experts(model_config, layer_type))
        for name in sections[layer_type]:
            changes[name] = values
    return model_config.replace(**changes) if changes else model_config


# ------------------------------------------------------------------------------------------------ the grid
def grid_settings(model_config, thresholds=DEFAULT_THRESHOLDS) -> list[tuple[str, str]]:
    """[(mlp setting, attention setting)]: the dense mode, then for each layer type the model has (the other one
    dense): top-K for K in {N, N/2, N/4, N/8, 1}, threshold and threshold-top-K at each threshold."""
    rows = [("dense", "dense")]
    sections = layer_sections(model_config)
    for layer_type in LAYER_TYPES:
        if not sections[layer_type]:
            continue
        n = _num_experts(model_config, layer_type)
        settings = [f"top_k:{k}" for k in dict.fromkeys(max(1, n // d) for d in (1, 2, 4, 8, n))]
        settings += [f"{mode}:{eps:g}" for mode in ("threshold", "threshold_top_k") for eps in thresholds]
        rows += [(s, "dense") if layer_type == "mlp" else ("dense", s) for s in settings]
    return rows


def _active(result: dict, sections: list[str], key: str):
    """The mean over the layer type's sections (weighted by their layer counts) of '<section>/<key>' and the
    per-layer values, from an evaluation result."""
    per_layer = []
    for name in sections:
        per_layer += list(result.get(f"{name}/{key}_per_layer", []))
    return (sum(per_layer) / len(per_layer) if per_layer else None), per_layer


def evaluate_grid(workdir: str, *, step: int | None = None, max_batches: int | None = None,
                  thresholds=DEFAULT_THRESHOLDS, progress=print) -> dict:
    """Evaluate a checkpoint at every grid setting on the same validation batches. Returns {'workdir', 'step',
    'rows': [{'mlp', 'attention', 'loss', 'stderr', 'bits_per_byte', 'mlp_active_fraction',
    'attention_active_fraction', 'mlp_threshold_active', 'attention_threshold_active', per-layer lists}]}."""
    import jax

    from grin_jax import models
    from grin_jax.train.evaluate import evaluate
    from grin_jax.train.step import make_eval_step
    from grin_jax.train.trainer import load_trained

    config, _, params, tokenizer, step = load_trained(workdir, step, with_step=True)
    base = models.model_config_from(config.model)
    sections = layer_sections(base)
    measured = {}  # (layer type, threshold) -> mean count over the threshold, from the threshold row

    def score(mlp: str, attention: str) -> dict:
        resolved = {}
        for layer_type, text in (("mlp", mlp), ("attention", attention)):
            mode, value = parse_setting(text)
            if mode == "threshold_top_k":
                n = _num_experts(base, layer_type)
                count = measured.get((layer_type, value))
                if count is None:  # not measured yet: a threshold pass first
                    score(**{layer_type: f"threshold:{value:g}", ("attention" if layer_type == "mlp" else "mlp"):
                             "dense"})
                    count = measured[(layer_type, value)]
                text = f"top_k:{min(n, max(1, round(count)))}"
            resolved[layer_type] = text
        model_config = with_sparsity(base, **resolved)
        graphdef, _ = models.abstract_init(model_config)
        run_config = config.copy_and_resolve_references()
        result = evaluate(jax.jit(make_eval_step(graphdef)), params, run_config, tokenizer, max_batches=max_batches)
        row = {"mlp": mlp, "attention": attention, "mlp_as": resolved["mlp"], "attention_as": resolved["attention"],
               "loss": result["loss"], "stderr": result["stderr"], "bits_per_byte": result["bits_per_byte"]}
        for layer_type in LAYER_TYPES:
            for key in ("active_fraction", "threshold_active"):
                mean, per_layer = _active(result, sections[layer_type], key)
                row[f"{layer_type}_{key}"] = mean
                row[f"{layer_type}_{key}_per_layer"] = per_layer
            mode, value = parse_setting(resolved[layer_type])
            if mode == "threshold":
                measured[(layer_type, value)] = row[f"{layer_type}_threshold_active"]
        return row

    rows = []
    settings = grid_settings(base, thresholds)
    for i, (mlp, attention) in enumerate(settings):
        row = score(mlp, attention)
        rows.append(row)
        progress(f"[{i + 1}/{len(settings)}] mlp {mlp:<20} attention {attention:<20} loss {row['loss']:.4f}  "
                 f"active mlp {_fmt(row['mlp_active_fraction'])} attention {_fmt(row['attention_active_fraction'])}")
    return {"workdir": os.path.abspath(workdir), "step": step, "max_batches": max_batches, "rows": rows}


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ outputs
CSV_FIELDS = ("mlp", "attention", "mlp_as", "attention_as", "loss", "stderr", "bits_per_byte",
              "mlp_active_fraction", "attention_active_fraction", "mlp_threshold_active",
              "attention_threshold_active")


def write_outputs(grid: dict, out_dir: str) -> list[str]:
    """grid.json (everything), grid.csv (CSV_FIELDS), grid.md (a table) and loss_vs_active.png, written atomically;
    returns their paths."""
    from grin_jax.train.metrics import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("grid.json", "grid.csv", "grid.md", "loss_vs_active.png")]
    write_json_atomic(paths[0], grid)
    tmp = paths[1] + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(grid["rows"])
    os.replace(tmp, paths[1])
    tmp = paths[2] + ".tmp"
    with open(tmp, "w") as f:
        f.write(markdown_table(grid))
    os.replace(tmp, paths[2])
    plot_grid([grid], paths[3])
    return paths


def markdown_table(grid: dict) -> str:
    lines = [f"Checkpoint step {grid['step']} of {grid['workdir']}; validation batches: "
             f"{grid['max_batches'] or 'the whole split'}.", "",
             "| MLP | attention | evaluated as | loss ± s.e. | MLP active | attention active |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in grid["rows"]:
        as_ = ", ".join(f"{t} {r[t + '_as']}" for t in LAYER_TYPES if r[t + "_as"] != r[t])
        lines.append(f"| {r['mlp']} | {r['attention']} | {as_ or '-'} | {r['loss']:.4f} ± {_fmt(r['stderr'], 4)} | "
                     f"{_fmt(r['mlp_active_fraction'])} | {_fmt(r['attention_active_fraction'])} |")
    return "\n".join(lines) + "\n"


def label_axes(axes, dense_marker: str, ylabel: str) -> None:
    """Titles, labels and limits of a (MLP, attention) pair of loss-against-active-fraction panels."""
    for ax, layer_type in zip(axes, LAYER_TYPES):
        name = "MLP" if layer_type == "mlp" else "attention"
        ax.set_xlabel(f"active fraction of the {name} experts (other layer type dense)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} layers ({dense_marker})")
    axes[0].set_ylabel(ylabel)


def plot_grid(grids: list[dict], path: str, labels: list[str] | None = None) -> None:
    """Validation loss against active fraction, one panel per layer type (the other dense), a line per mode
    (top-K, threshold, threshold-top-K) and per grid, the dense mode as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = {"top_k": "o-", "threshold": "s--", "threshold_top_k": "^:"}
    for g, grid in enumerate(grids):
        label = labels[g] if labels else ""
        dense = next(r for r in grid["rows"] if r["mlp"] == "dense" and r["attention"] == "dense")
        for ax, layer_type in zip(axes, LAYER_TYPES):
            other = "attention" if layer_type == "mlp" else "mlp"
            ax.axhline(dense["loss"], color=f"C{g}", lw=0.8, ls="--")
            for mode, style in markers.items():
                rows = [r for r in grid["rows"] if r[other] == "dense" and parse_setting(r[layer_type])[0] == mode
                        and r[f"{layer_type}_active_fraction"] is not None]
                rows.sort(key=lambda r: r[f"{layer_type}_active_fraction"])
                if rows:
                    ax.plot([r[f"{layer_type}_active_fraction"] for r in rows], [r["loss"] for r in rows], style,
                            color=f"C{g}", alpha=0.5 + 0.5 * (mode == "top_k"), ms=4,
                            label=f"{label} {mode}".strip())
    label_axes(axes, "dashed: dense mode", "validation loss (nats/token)")
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if handles:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ command
def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise ValueError(f"--thresholds={text!r} is invalid: accepted values are comma-separated numbers >= 0")
    return values


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grin_jax.sparsity",
                                     description="validation loss against active fraction of a DS-MoE checkpoint")
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    parser.add_argument("--max_batches", type=int, default=0, help="validation batches (0: the whole split)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                        help="comma-separated EPS of the threshold modes (keep expert i when N * S_i > EPS)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/sparsity)")
    args = parser.parse_args(argv)
    if args.max_batches < 0:
        raise ValueError(f"--max_batches={args.max_batches} is invalid: accepted values are integers >= 0")
    thresholds = _thresholds(args.thresholds)
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        raise ValueError(f"--workdir={args.workdir!r} is not a training run's workdir (no config.json)")
    grid = evaluate_grid(args.workdir, step=args.step, max_batches=args.max_batches or None, thresholds=thresholds,
                         progress=lambda line: print(line, flush=True))
    for path in write_outputs(grid, args.out or os.path.join(args.workdir, "sparsity")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
