"""Tables and a plot for the granularity sweep: validation loss (primary) and smoothed train loss by size x variant,
mean and range over seeds; the paired gain of every G over G = 1 (same seed = same initialisation seed and the same
batches), with its range over seeds; the CSVs of seed means for `python -m grin_jax.scaling.fit --table`.

    python experiments/granularity/analyze.py [--sweep experiments/granularity/runs] > experiments/granularity/tables.md

A paired difference is called resolved when every seed gives it the same sign; otherwise it is inside the noise.
"""

import argparse
import collections
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = (("validation_loss", "validation loss over the whole held-out split (nats/byte; primary)"),
           ("smoothed_train_loss", "smoothed final train loss (nats/byte; the law's `loss`)"))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def variant_of(row):
    return "dense" if row["model.layout"] == "dense" else f"G={int(row['model.moe.granularity'])}"


def group(rows):
    """{(d_model, variant): {seed: row}}"""
    cells = collections.defaultdict(dict)
    for r in rows:
        cells[(int(r["model.d_model"]), variant_of(r))][int(r["train.seed"])] = r
    return cells


def paired(cells, d, variant, key, *, reverse=False):
    """Per seed L(G=1) - L(variant) (reverse: L(variant) - L(G=1)), for the seeds both have."""
    base, other = cells.get((d, "G=1"), {}), cells.get((d, variant), {})
    diffs = {s: float(base[s][key]) - float(other[s][key]) for s in sorted(set(base) & set(other))}
    return {s: -v for s, v in diffs.items()} if reverse else diffs


def dropped_fraction(sweep_dir, row):
    """Mean of train/moe/dropped_fraction over the last 10 % of a trial's logged steps (tokens no expert chose)."""
    path = os.path.join(sweep_dir, "trials", row["trial"], "metrics.jsonl")
    with open(path) as f:
        values = [r["train/moe/dropped_fraction"] for r in map(json.loads, filter(str.strip, f))
                  if r.get("train/moe/dropped_fraction") is not None]
    return float(np.mean(values[-max(1, len(values) // 10):])) if values else float("nan")


def fmt_range(values):
    v = np.asarray(values, float)
    return f"{v.mean():.4f} [{v.min():.4f}, {v.max():.4f}]" if v.size > 1 else (f"{v[0]:.4f}" if v.size else "–")


def fmt_diff(diffs):
    if not diffs:
        return "–"
    v = np.asarray(list(diffs.values()))
    resolved = len(v) > 1 and (np.all(v > 0) or np.all(v < 0))
    text = f"{v.mean():+.4f} [{v.min():+.4f}, {v.max():+.4f}]"
    return f"**{text}**" if resolved else text


def plot(cells, sizes, variants, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, title) in zip(axes, METRICS):
        for d in sizes:
            xs, means, lo, hi = [], [], [], []
            for i, variant in enumerate(variants[1:]):
                diffs = list(paired(cells, d, variant, key).values())
                if diffs:
                    xs.append(i + 0.08 * (sizes.index(d) - 1))
                    means.append(np.mean(diffs))
                    lo.append(np.mean(diffs) - min(diffs))
                    hi.append(max(diffs) - np.mean(diffs))
            ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=f"d_model={d}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(variants) - 1), variants[1:])
        ax.set_ylabel("L(G=1) − L(variant), nats/byte")
        ax.set_title(title.split(" (")[0] + ": gain over G=1\n(mean, bars = range over seeds)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default=os.path.join(HERE, "runs"))
    parser.add_argument("--out", default=HERE, help="where the CSVs and paired_gain.png go")
    args = parser.parse_args(argv)
    rows = read_rows(os.path.join(args.sweep, "results.csv"))
    done = [r for r in rows if r.get("status") == "done"]
    commits = sorted({(r.get("git_commit") or "?")[:10] + (" (dirty)" if r.get("git_dirty") == "True" else "")
                      for r in done})
    print(f"{len(done)}/{len(rows)} trials done; code: {', '.join(commits)}; not done: "
          f"{[r['trial'] for r in rows if r.get('status') != 'done']}\n")
    cells = group(done)
    sizes = sorted({d for d, _ in cells})
    gs = sorted({int(r["model.moe.granularity"]) for r in done if r["model.layout"] == "moe"})
    variants = [f"G={g}" for g in gs] + ["dense"]
    seeds = sorted({int(r["train.seed"]) for r in done})

    # Seed means of the MoE rows for the fitter (N = the law's N, written by the trainer), one file per metric.
    for key, name in (("smoothed_train_loss", "results_moe_mean.csv"), ("validation_loss", "results_moe_val_mean.csv")):
        means = []
        for (d, variant), by_seed in sorted(cells.items()):
            if variant == "dense":
                continue
            rs = list(by_seed.values())
            means.append({"N": rs[0]["N"], "D": rs[0]["D"], "G": rs[0]["G"], "d_model": d, "seeds": len(rs),
                          "loss": float(np.mean([float(r[key]) for r in rs])),
                          "flops": float(np.mean([float(r["flops"]) for r in rs])), "status": "done"})
        write_rows(os.path.join(args.out, name), means)

    for key, title in METRICS:
        print(f"### {title}: mean [min, max] over seeds {seeds}\n")
        print("| d_model | N (MoE) | " + " | ".join(variants[:-1]) + " | dense (N) |")
        print("|---|---|" + "---|" * len(variants))
        for d in sizes:
            n_moe = f"{int(next(iter(cells[(d, 'G=1')].values()))['N']):,}" if (d, "G=1") in cells else "?"
            n_dense = f"{int(next(iter(cells[(d, 'dense')].values()))['N']):,}" if (d, "dense") in cells else "?"
            values = [fmt_range([float(r[key]) for r in cells.get((d, v), {}).values()]) for v in variants]
            print(f"| {d} | {n_moe} | " + " | ".join(values[:-1]) + f" | {values[-1]} ({n_dense}) |")
        print()
    stderrs = [float(r["validation_loss_stderr"]) for r in done]
    print(f"Standard error of one run's validation loss over its {done[0]['validation_documents']} documents: "
          f"{min(stderrs):.4f}-{max(stderrs):.4f} (shared by every run: the same documents, so it does not apply "
          "to paired differences).\n")

    for key, title in METRICS:
        print(f"### paired gain over G = 1, {title.split(' (')[0]}: mean [min, max] over seeds; **bold** = every "
              "seed agrees on the sign\n")
        print("| d_model | " + " | ".join(f"L(G=1) − L({v})" for v in variants[1:-1])
              + " | L(dense) − L(G=1) |")
        print("|---|" + "---|" * (len(variants) - 1))
        for d in sizes:
            cols = [fmt_diff(paired(cells, d, v, key)) for v in variants[1:-1]]
            cols.append(fmt_diff(paired(cells, d, "dense", key, reverse=True)))
            print(f"| {d} | " + " | ".join(cols) + " |")
        print()

    print("### cost and dropped tokens (mean over seeds; tokens/s and wall on a shared 2-core CPU, noisy)\n")
    print("| d_model | variant | paper FLOPs/token | vs G=1 | dropped tokens (last 10 % of steps) | tokens/s | "
          "wall s | corpus fraction seen |")
    print("|---|---|---|---|---|---|---|---|")
    for d in sizes:
        base_flops = np.mean([float(r["paper_flops_per_token"]) for r in cells.get((d, "G=1"), {}).values()])
        for v in variants:
            rs = list(cells.get((d, v), {}).values())
            if rs:
                flops = np.mean([float(r["paper_flops_per_token"]) for r in rs])
                dropped = [dropped_fraction(args.sweep, r) for r in rs]
                print(f"| {d} | {v} | {flops / 1e6:.3f}M | {flops / base_flops - 1:+.1%} | "
                      f"{'–' if v == 'dense' else f'{np.mean(dropped):.1%}'} | "
                      f"{np.mean([float(r['tokens_per_second']) for r in rs]):,.0f} | "
                      f"{np.mean([float(r['wall_seconds']) for r in rs]):.0f} | "
                      f"{np.mean([float(r['corpus_fraction']) for r in rs]):.3f} |")
    plot(cells, sizes, variants, os.path.join(args.out, "paired_gain.png"))


if __name__ == "__main__":
    main()
