"""Plots of a scaling-law fit (grin_jax.scaling.fit): loss vs granularity, loss vs FLOPs with the compute-optimal
frontier, and the per-G optimum (docs/fine_grained.md)."""

from __future__ import annotations

import os

import numpy as np

from grin_jax.scaling.law import loss as law_loss

def _estimated_flops(table, expansion, dense, aspect=64.0):
    """FLOPs per row: the table's ``flops`` column, else the paper formula with d_model = 64·n_blocks recovered
    from N (MoE: N = d²(8E+4)·n_blocks; dense: E = 1, G = 1, no router term)."""
    from grin_jax.scaling import flops as fl

    if "flops" in table:
        return table["flops"]
    E = 1.0 if dense else expansion
    d, n = fl.d_model_from_params(table["N"], E, aspect)
    G = np.ones_like(table["N"]) if dense else table["G"]
    return fl.flops(d, n, E, G, table["D"], c_r=0.0 if dense else fl.C_R)


def make_plots(table, result, out_dir, *, expansion: float = 64.0) -> list[str]:
    """Write PNGs into ``out_dir`` and return their paths (result: a fit.FitResult).

    MoE law: loss_vs_granularity.png (data per (N, D) size + fitted curves), loss_vs_flops.png (data + per-G
    compute-optimal curves + the frontier) and optimum.png (per-G optimal loss at four budgets, best G marked).
    Dense law: loss_vs_flops.png only (E = 1, G = 1, no router cost).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grin_jax.scaling.optimal import scan_granularities

    os.makedirs(out_dir, exist_ok=True)
    k = result.coeffs
    dense = result.law == "dense"
    N, D, L = table["N"], table["D"], table["loss"]
    G = np.ones_like(N) if dense else table["G"]
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # 1. loss vs G for each (N, D) size, fitted curves.
    if not dense:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        groups = sorted({(float(n), float(d)) for n, d in zip(N, D)})
        counts = {gd: int(np.sum((N == gd[0]) & (D == gd[1]))) for gd in groups}
        groups = sorted(sorted(groups, key=lambda gd: -counts[gd])[:10])
        cmap = plt.get_cmap("viridis")
        g_grid = np.geomspace(max(G.min() / 1.5, 0.5), G.max() * 1.5, 100)
        for i, (n, d) in enumerate(groups):
            color = cmap(i / max(len(groups) - 1, 1))
            m = (N == n) & (D == d)
            ax.scatter(G[m], L[m], color=color, s=18)
            ax.plot(g_grid, law_loss(n, d, g_grid, k), color=color, lw=1, label=f"N={n:.3g}, D={d:.3g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("granularity G")
        ax.set_ylabel("loss")
        ax.set_title("loss vs granularity (points: data, lines: fit)")
        ax.legend(fontsize=7)
        save(fig, "loss_vs_granularity.png")

    # 2. loss vs FLOPs, with the fitted compute-optimal frontier.
    F = _estimated_flops(table, expansion, dense)
    budgets = np.geomspace(F.min() / 2, F.max() * 8, 16)
    granularities = (1,) if dense else (1, 2, 4, 8, 16, 32, 64)
    opt_kw = dict(expansion_rate=1.0, c_r=0.0) if dense else dict(expansion_rate=expansion)
    scans = [scan_granularities(b, k, granularities=granularities, **opt_kw) for b in budgets]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if dense:
        ax.scatter(F, L, s=18, label="data")
    else:
        sc = ax.scatter(F, L, c=np.log2(G), cmap="plasma", s=18)
        fig.colorbar(sc, ax=ax, label="log2 G")
        for j, Gj in enumerate(granularities):
            ax.plot(budgets, [s[j].loss for s in scans], lw=0.8, alpha=0.6, label=f"G={Gj} (opt. size)")
    ax.plot(budgets, [min(a.loss for a in s) for s in scans], "k--", lw=1.5, label="compute-optimal")
    ax.set_xscale("log")
    est = "" if "flops" in table else (" (estimated, dense)" if dense else f" (estimated, E={expansion:g})")
    ax.set_xlabel("training FLOPs" + est)
    ax.set_ylabel("loss")
    ax.set_title("loss vs FLOPs")
    ax.legend(fontsize=7)
    save(fig, "loss_vs_flops.png")

    # 3. the predicted optimum: per-G optimal loss at a few budgets, the best G marked.
    if not dense:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        gs = tuple(2**i for i in range(0, 9))
        for b in np.geomspace(F.min(), F.max() * 100, 4):
            s = scan_granularities(b, k, granularities=gs, expansion_rate=expansion)
            losses = [a.loss for a in s]
            j = int(np.argmin(losses))
            (line,) = ax.plot(gs, losses, marker="o", ms=3, label=f"F={b:.2g}: G*={gs[j]}, D={s[j].tokens:.2g}")
            ax.scatter([gs[j]], [losses[j]], s=80, facecolors="none", edgecolors=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("granularity G")
        ax.set_ylabel("predicted loss at the compute-optimal size")
        ax.set_title(f"predicted optimum (E={expansion:g}, d_model = 64 n_blocks)")
        ax.legend(fontsize=7)
        save(fig, "optimum.png")
    return paths
