"""Tables and plots of the GRIN vs GShard sweep (configs/sweeps/grin_vs_gshard.py).

    python experiments/grin_vs_gshard/analyze.py \
        [--sweep experiments/grin_vs_gshard/runs] > experiments/grin_vs_gshard/tables.md

Writes loss_curves.png (train loss and the paired difference to GShard over training), expert_load.png (the final
per-expert load of every router) and router_grad_fraction.png. Every comparison is paired by seed (same
initialisation seed, same batches); a difference is called resolved when every seed gives it the same sign.
"""

import argparse
import collections
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GSHARD = "top-2 softmax"


def router_of(row) -> str:
    eps = row.get("model.moe.router_options.jitter_eps")
    return GSHARD if eps in (None, "", "None") else f"SMv2 eps={float(eps):g}"


def load_runs(sweep_dir):
    """{router: {seed: {'summary', 'records'}}} of the finished trials, and the result rows."""
    with open(os.path.join(sweep_dir, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    runs = collections.defaultdict(dict)
    for row in rows:
        if row.get("status") != "done":
            continue
        workdir = os.path.join(sweep_dir, "trials", row["trial"])
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        runs[router_of(row)][int(row["train.seed"])] = {"summary": summary, "records": records}
    return runs, rows


def order(routers):
    return sorted((r for r in routers if r != GSHARD), key=lambda r: float(r.split("=")[1])) + \
        [r for r in routers if r == GSHARD]


def series(run, key):
    """{step: value} of a metric in a run's records."""
    return {r["step"]: r[key] for r in run["records"] if r.get(key) is not None}


def fmt(values, signed=False):
    v = np.asarray(values, float)
    if v.size == 0:
        return "–"
    f = "{:+.4f}" if signed else "{:.4f}"
    text = f"{f.format(v.mean())} [{f.format(v.min())}, {f.format(v.max())}]"
    return f"**{text}**" if signed and v.size > 1 and (np.all(v > 0) or np.all(v < 0)) else text


def paired_to_gshard(runs, router, key_fn):
    """Per seed: value(GShard) - value(router), for the seeds both have (positive: the router is better)."""
    base, other = runs.get(GSHARD, {}), runs.get(router, {})
    return {s: key_fn(base[s]) - key_fn(other[s]) for s in sorted(set(base) & set(other))}


def load_stats(run):
    """(max / mean, coefficient of variation) of the last logged per-layer expert load, averaged over layers."""
    loads = [r for r in run["records"] if r.get("train/moe/expert_load") is not None]
    if not loads:
        return float("nan"), float("nan")
    load_LE = np.asarray(loads[-1]["train/moe/expert_load"], float)
    load_LE = load_LE / load_LE.sum(-1, keepdims=True)
    return float(np.mean(load_LE.max(-1) * load_LE.shape[-1])), float(np.mean(load_LE.std(-1) / load_LE.mean(-1)))


def print_tables(runs, routers, seeds):
    print("### final validation loss (whole held-out split, nats/byte): mean [min, max] over seeds "
          f"{seeds}, and the paired gain over top-2 softmax\n")
    print("| router | validation loss | ± s.e. (documents) | smoothed train loss | L(top-2) − L(router), val | "
          "L(top-2) − L(router), train |")
    print("|---|---|---|---|---|---|")
    for router in routers:
        rs = list(runs[router].values())
        val = [r["summary"]["validation_loss"] for r in rs]
        se = np.mean([r["summary"]["validation_loss_stderr"] for r in rs])
        train = [r["summary"]["smoothed_train_loss"] for r in rs]
        gain_val = paired_to_gshard(runs, router, lambda r: r["summary"]["validation_loss"])
        gain_train = paired_to_gshard(runs, router, lambda r: r["summary"]["smoothed_train_loss"])
        dash = router == GSHARD
        print(f"| {router} | {fmt(val)} | {se:.4f} | {fmt(train)} | "
              f"{'–' if dash else fmt(list(gain_val.values()), True)} | "
              f"{'–' if dash else fmt(list(gain_train.values()), True)} |")
    print("\n**bold**: every seed agrees on the sign. The standard error over documents is shared by every run (the "
          "same documents), so it does not apply to paired differences.\n")

    steps = sorted(set.intersection(*[set(series(run, "eval/loss")) for rs in runs.values() for run in rs.values()]))
    print("### over training: paired gain over top-2 softmax, L(top-2) − L(router), validation loss on 16 batches "
          "(the final step: the whole split); mean [min, max] over seeds\n")
    print("| step | tokens | " + " | ".join(r for r in routers if r != GSHARD) + " |")
    print("|---|---|" + "---|" * (len(routers) - 1))
    tokens_per_step = next(iter(next(iter(runs.values())).values()))["summary"]["tokens_seen"] / \
        next(iter(next(iter(runs.values())).values()))["summary"]["steps"]
    for step in steps:
        cells = [fmt(list(paired_to_gshard(runs, r, lambda run: series(run, "eval/loss")[step]).values()), True)
                 for r in routers if r != GSHARD]
        print(f"| {step} | {step * tokens_per_step / 1e6:.2f}M | " + " | ".join(cells) + " |")
    print()
    windows = [(1, 100), (101, 300), (301, 10**9)]
    print("### over training: paired gain over top-2 softmax in train loss, mean over the steps of each window "
          "(every step's loss, train/loss_mean)\n")
    print("| steps | " + " | ".join(r for r in routers if r != GSHARD) + " |")
    print("|---|" + "---|" * (len(routers) - 1))
    for lo, hi in windows:
        def window_mean(run, lo=lo, hi=hi):
            values = [v for s, v in series(run, "train/loss_mean").items() if lo <= s <= hi]
            return float(np.mean(values)) if values else float("nan")
        if all(np.isnan(window_mean(run)) for rs in runs.values() for run in rs.values()):
            continue
        cells = [fmt(list(paired_to_gshard(runs, r, window_mean).values()), True) for r in routers if r != GSHARD]
        print(f"| {lo}-{hi if hi < 10**9 else 'end'} | " + " | ".join(cells) + " |")
    print()

    print("### router-gradient fraction, candidates and load at the end of training (mean over seeds)\n")
    print("| router | tokens whose router gets a task gradient (mean over training) | at the end | "
          "mean candidates per slot | max load / mean load | load coefficient of variation |")
    print("|---|---|---|---|---|---|")
    for router in routers:
        rs = list(runs[router].values())
        frac = [np.mean(list(series(r, "train/moe/router_grad_fraction").values())) for r in rs]
        end = [list(series(r, "train/moe/router_grad_fraction").values())[-1] for r in rs]
        cand = [np.mean(list(series(r, "train/moe/mean_candidates").values()) or [np.nan]) for r in rs]
        cand_text = "–" if np.all(np.isnan(cand)) else f"{np.nanmean(cand):.2f}"
        stats = np.asarray([load_stats(r) for r in rs])
        print(f"| {router} | {np.mean(frac):.3f} | {np.mean(end):.3f} | {cand_text} | "
              f"{stats[:, 0].mean():.2f} | {stats[:, 1].mean():.3f} |")
    print()


def plot_curves(runs, routers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = dict(zip(routers, plt.cm.viridis(np.linspace(0, 0.9, len(routers)))))
    colors[GSHARD] = "tab:red"
    for router in routers:
        curves = [series(run, "train/loss_mean") for run in runs[router].values()]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        values = np.asarray([[c[s] for s in steps] for c in curves])
        axes[0].plot(steps, values.mean(0), color=colors[router], label=router, lw=1.2)
        axes[0].fill_between(steps, values.min(0), values.max(0), color=colors[router], alpha=0.15)
        if router != GSHARD:
            base = runs[GSHARD]
            seeds = sorted(set(base) & set(runs[router]))
            diffs = np.asarray([[series(base[s], "train/loss_mean")[t] - series(runs[router][s], "train/loss_mean")[t]
                                 for t in steps] for s in seeds])
            kernel = np.ones(5) / 5  # 5 records = 50 steps
            smooth = np.asarray([np.convolve(d, kernel, mode="valid") for d in diffs])
            x = steps[2:2 + smooth.shape[1]]
            axes[1].plot(x, smooth.mean(0), color=colors[router], label=router, lw=1.2)
            axes[1].fill_between(x, smooth.min(0), smooth.max(0), color=colors[router], alpha=0.15)
    axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 3.0))
    axes[0].set_xlabel("step (16 x 128 tokens)")
    axes[0].set_ylabel("train loss (mean over the 10 steps), nats/byte")
    axes[0].set_title("train loss: mean over seeds, band = range", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("L(top-2 softmax) − L(SMv2), nats/byte")
    axes[1].set_title("paired gain of SparseMixer-v2 over top-2 softmax (50-step moving mean;\n"
                      "band = range over seeds; > 0: SparseMixer-v2 better)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_load(runs, routers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(routers), figsize=(2.6 * len(routers), 3), sharey=True)
    for ax, router in zip(np.atleast_1d(axes), routers):
        fractions = []
        for run in runs[router].values():
            loads = [r for r in run["records"] if r.get("train/moe/expert_load") is not None]
            load_LE = np.asarray(loads[-1]["train/moe/expert_load"], float)
            fractions.extend((load_LE / load_LE.sum(-1, keepdims=True) * load_LE.shape[-1]).ravel())
        ax.hist(fractions, bins=np.linspace(0, 3, 31), color="tab:red" if router == GSHARD else "tab:blue")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(router, fontsize=9)
        ax.set_xlabel("load / uniform load")
    np.atleast_1d(axes)[0].set_ylabel("experts (all layers, seeds)")
    fig.suptitle("final per-expert load (1 = balanced)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grad_fraction(runs, routers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for router in routers:
        if router == GSHARD:
            continue
        curves = [series(run, "train/moe/router_grad_fraction") for run in runs[router].values()]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        values = np.asarray([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.mean(0), label=router)
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title("tokens whose router gets a task-loss gradient\n(some slot keeps >= 2 candidates; top-2 softmax: "
                 "all)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default=os.path.join(HERE, "runs"))
    parser.add_argument("--out", default=HERE, help="where the plots go")
    args = parser.parse_args(argv)
    runs, rows = load_runs(args.sweep)
    routers = order(runs)
    seeds = sorted({s for rs in runs.values() for s in rs})
    commits = sorted({(r.get("git_commit") or "?")[:10] + (" (dirty)" if r.get("git_dirty") == "True" else "")
                      for r in rows if r.get("status") == "done"})
    print(f"{sum(r.get('status') == 'done' for r in rows)}/{len(rows)} trials done; code: {', '.join(commits)}\n")
    print_tables(runs, routers, seeds)
    plot_curves(runs, routers, os.path.join(args.out, "loss_curves.png"))
    plot_load(runs, routers, os.path.join(args.out, "expert_load.png"))
    plot_grad_fraction(runs, routers, os.path.join(args.out, "router_grad_fraction.png"))


if __name__ == "__main__":
    main()
