"""End-of-run PNG plots: loss curves and expert load per layer."""

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
    valid = [(r["step"], r["eval/loss"]) for r in records if r.get("eval/loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", lw=1.5)
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


def write_plots(workdir: str, records: list[dict], load_LE=None, *, title: str = "") -> list[str]:
    paths = [plot_losses(records, os.path.join(workdir, "loss.png"), title=title)]
    if load_LE is not None and np.asarray(load_LE).size:
        paths.append(plot_expert_load(load_LE, os.path.join(workdir, "expert_load.png"), title=title))
    return paths
