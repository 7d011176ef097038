"""End-of-run PNG plots: loss curves and expert load per layer.

Keys read from metrics.jsonl records: 'train/loss'; 'eval/loss' with its standard error over documents
'eval/stderr' (error bars; absent in older runs) and 'eval/final' (the end-of-run evaluation, drawn with its own
marker); the expert load [L, E] under 'train/<section>/expert_load' (e.g. 'train/moe/expert_load', the name old
and new runs share)."""

from __future__ import annotations

import os

import numpy as np


def _figure(figsize):
    """A figure outside pyplot's global state (no backend switch: notebooks keep their inline backend)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def plot_losses(records: list[dict], path: str, *, title: str = "") -> str:
    """Train loss (and validation loss where logged) against step."""
    fig, ax = _figure((7, 4.5))
    train = [(r["step"], r["train/loss"]) for r in records if r.get("train/loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    for final, style, label in ((False, "o-", "validation loss (first train.eval_batches)"),
                                (True, "D", "final validation loss (train.final_eval_batches)")):
        valid = [(r["step"], r["eval/loss"], r.get("eval/stderr") or 0.0) for r in records
                 if r.get("eval/loss") is not None and bool(r.get("eval/final")) == final]
        if valid:
            steps, losses, stderrs = zip(*valid)
            ax.errorbar(steps, losses, yerr=stderrs, fmt=style, lw=1.5, capsize=3, label=label + " ± 1 s.e.")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_expert_load(load_LE, path: str, *, title: str = "") -> str:
    """Heat map of the fraction of token-slots per expert (rows: layers), 1/E = balanced."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_layers, num_experts = load_LE.shape
    fig, ax = _figure((max(5, 0.4 * num_experts + 2), max(3, 0.4 * num_layers + 1.5)))
    image = ax.imshow(load_LE * num_experts, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers))
    fig.colorbar(image, ax=ax, label="load x E (1 = balanced)")
    ax.set_title(title or "expert load per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def latest_expert_load(records: list[dict]):
    """The last logged expert load [L, E] (a list of lists), or None: 'train/moe/expert_load' first, else the
    first 'train/.../expert_load' key of the latest record that has one."""
    for record in reversed(records):
        if record.get("train/moe/expert_load"):
            return record["train/moe/expert_load"]
        for key, value in record.items():
            if key.startswith("train/") and key.endswith("/expert_load") and value:
                return value
    return None


def write_plots(workdir: str, records: list[dict], load_LE=None, *, title: str = "") -> list[str]:
    """loss.png, and expert_load.png when `load_LE` (default: the latest one logged in `records`) is given."""
    if load_LE is None:
        load_LE = latest_expert_load(records)
    paths = [plot_losses(records, os.path.join(workdir, "loss.png"), title=title)]
    if load_LE is not None and np.asarray(load_LE).size:
        paths.append(plot_expert_load(load_LE, os.path.join(workdir, "expert_load.png"), title=title))
    return paths
