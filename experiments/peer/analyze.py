"""Tables and plots of the PEER sweep (configs/sweeps/peer.py).

    python experiments/peer/analyze.py [--sweep experiments/peer/runs] > experiments/peer/tables.md

Writes loss_vs_experts.png: the validation loss against N for PEER with and without the query BatchNorm and for the
product-key memory (the dense FFN and no FFN as lines), and the validation split's expert unevenness against N,
BatchNorm on and off. Comparisons are paired by seed (same initialisation seed, same batches); a
difference is called resolved when every seed gives it the same sign.
"""

import argparse
import collections
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DENSE, NONE = "dense FFN", "no FFN"


def label(row) -> tuple:
    """(family, N or None): family in DENSE, NONE, 'PEER BN', 'PEER no BN', 'PKM BN'."""
    layout = row["model.layout"].split(",")[1]
    if layout == "dense":
        return DENSE, None
    if layout == "none":
        return NONE, None
    n = int(float(row["model.peer.num_experts"]))
    if row["model.peer.expert_type"] == "value":
        return "PKM BN", n
    return ("PEER BN" if row["model.peer.query_norm"] == "batchnorm" else "PEER no BN"), n


def load_runs(sweep_dir):
    """{(family, N): {seed: summary}} of the finished trials, and the number of trials not finished."""
    with open(os.path.join(sweep_dir, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    runs, missing = collections.defaultdict(dict), 0
    for row in rows:
        if row.get("status") != "done":
            missing += 1
            continue
        with open(os.path.join(sweep_dir, "trials", row["trial"], "summary.json")) as f:
            runs[label(row)][int(row["train.seed"])] = json.load(f)
    return runs, missing


def fmt(values, signed=False, digits=4):
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return "–"
    f = "{:+.%df}" % digits if signed else "{:.%df}" % digits
    text = f"{f.format(v.mean())} [{f.format(v.min())}, {f.format(v.max())}]"
    return f"**{text}**" if signed and v.size > 1 and (np.all(v > 0) or np.all(v < 0)) else text


def paired(runs, a, b, key="validation_loss"):
    """Per seed: value(a) - value(b) over the seeds both have (positive: b is better for a loss)."""
    sa, sb = runs.get(a, {}), runs.get(b, {})
    return [sa[s][key] - sb[s][key] for s in sorted(set(sa) & set(sb))]


def holds(diffs) -> str:
    d = np.asarray(diffs, float)
    if d.size == 0:
        return "not run"
    if d.size == 1:
        return "one seed only: no verdict"
    if np.all(d > 0):
        return "holds (every seed)"
    if np.all(d < 0):
        return "reversed (every seed)"
    return "inside the seed spread"


def print_tables(runs, missing):
    keys = sorted(runs, key=lambda k: ({DENSE: 0, NONE: 1}.get(k[0], 2), k[0], k[1] or 0))
    seeds = sorted({s for k in runs for s in runs[k]})
    commits = sorted({s.get("git_commit") for k in runs for s in runs[k].values()})
    print("# PEER at toy scale: tables\n")
    print(f"Seeds {seeds}; commit(s) {', '.join(c[:12] for c in commits if c)}; {missing} trial(s) not finished. "
          "Values: mean [min, max] over seeds; paired differences in **bold** when every seed agrees in sign.\n")
    print("## Validation loss (whole split, nats/token) and parameters\n")
    print("| middle FFN | N | validation loss | ± s.e. (docs) | vs dense (dense − this) | vs no FFN (none − this) "
          "| FFN params of the layer (total / active per token) |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        family, n = key
        summaries = list(runs[key].values())
        p = summaries[0]["params"]
        ffn_total = p.get("peer_experts", 0) + p.get("peer_router", 0)
        ffn_active = p.get("peer_experts_active", 0) + p.get("peer_router_active", 0)
        if family == DENSE:
            ffn_total = ffn_active = p["dense_ffn"] // 3
        elif family == NONE:
            ffn_total = ffn_active = 0
        print(f"| {family} | {'–' if n is None else f'{int(round(n ** 0.5))}²'} "
              f"| {fmt([s['validation_loss'] for s in summaries])} "
              f"| {np.mean([s['validation_loss_stderr'] for s in summaries]):.3f} "
              f"| {fmt(paired(runs, (DENSE, None), key), signed=True)} "
              f"| {fmt(paired(runs, (NONE, None), key), signed=True)} "
              f"| {ffn_total:,} / {ffn_active:,} |")
    print("\nThe layer's parameters: the dense FFN is a SwiGLU of width 512 (3 · 128 · 512); PEER's and PKM's include "
          "the query network (D·H·Q = 131,072) and the sub-keys, all active.\n")

    print("## Usage and unevenness over the validation split (the paper's Table 2 metrics)\n")
    print("| N | BN usage | BN unevenness | no-BN usage | no-BN unevenness | no BN − BN unevenness | PKM usage | "
          "PKM unevenness |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = sorted({k[1] for k in runs if k[1] is not None})
    for n in sizes:
        cells = []
        for family in ("PEER BN", "PEER no BN"):
            s = list(runs.get((family, n), {}).values())
            cells += [fmt([x.get("validation_peer/usage") for x in s], digits=4),
                      fmt([x.get("validation_peer/unevenness") for x in s], digits=3)]
        diff = paired(runs, ("PEER no BN", n), ("PEER BN", n), key="validation_peer/unevenness")
        pkm = list(runs.get(("PKM BN", n), {}).values())
        cells += [fmt(diff, signed=True, digits=3), fmt([x.get("validation_peer/usage") for x in pkm], digits=4),
                  fmt([x.get("validation_peer/unevenness") for x in pkm], digits=3)]
        print(f"| {int(round(n ** 0.5))}² | " + " | ".join(cells) + " |")

    print("\n## The paper's orderings at this scale\n")
    print("| claim (paper) | comparison (paired by seed) | difference | verdict |")
    print("|---|---|---|---|")
    largest = max(sizes) if sizes else None
    claims = []
    for n in sizes:
        tag = f"N={int(round(n ** 0.5))}²"
        claims.append((f"PEER beats the dense FFN (Table 1), {tag}", f"dense − PEER BN",
                       paired(runs, (DENSE, None), ("PEER BN", n))))
        claims.append((f"PEER beats PKM (Table 1), {tag}", "PKM − PEER BN", paired(runs, ("PKM BN", n), ("PEER BN", n))))
        claims.append((f"BN lowers unevenness (Table 2), {tag}", "unevenness no BN − BN",
                       paired(runs, ("PEER no BN", n), ("PEER BN", n), key="validation_peer/unevenness")))
        claims.append((f"BN does not hurt the loss (Table 2: perplexity within 0.09), {tag}", "loss no BN − BN",
                       paired(runs, ("PEER no BN", n), ("PEER BN", n))))
    for small, large in zip(sizes, sizes[1:]):
        tag = f"{int(round(small ** 0.5))}² → {int(round(large ** 0.5))}²"
        claims.append((f"more experts, lower loss (Fig. 3), {tag}", "loss(small N) − loss(large N), BN",
                       paired(runs, ("PEER BN", small), ("PEER BN", large))))
        claims.append((f"more experts, higher unevenness (Table 2), {tag}", "unevenness(large) − unevenness(small)",
                       paired(runs, ("PEER BN", large), ("PEER BN", small), key="validation_peer/unevenness")))
    if largest:
        claims.append(("a PEER layer beats no FFN", "none − PEER BN", paired(runs, (NONE, None), ("PEER BN", largest))))
    for claim, comparison, diffs in claims:
        verdict = holds(diffs)
        print(f"| {claim} | {comparison} | {fmt(diffs, signed=True)} | {verdict} |")


def plot(runs, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({k[1] for k in runs if k[1] is not None})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for family, style in (("PEER BN", "o-"), ("PEER no BN", "s--"), ("PKM BN", "^:")):
        xs = [n for n in sizes if (family, n) in runs]
        values = [[s["validation_loss"] for s in runs[(family, n)].values()] for n in xs]
        ax.errorbar(xs, [np.mean(v) for v in values],
                    yerr=[[np.mean(v) - min(v) for v in values], [max(v) - np.mean(v) for v in values]],
                    fmt=style, capsize=3, label=family)
        if family != "PKM BN":
            u = [[s.get("validation_peer/unevenness") for s in runs[(family, n)].values()] for n in xs]
            bx.errorbar(xs, [np.mean(v) for v in u], yerr=[[np.mean(v) - min(v) for v in u],
                                                           [max(v) - np.mean(v) for v in u]],
                        fmt=style, capsize=3, label=family)
    for family, color in ((DENSE, "k"), (NONE, "r")):
        if (family, None) in runs:
            ax.axhline(np.mean([s["validation_loss"] for s in runs[(family, None)].values()]), color=color,
                       lw=1, label=family)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("experts N")
        a.legend()
    ax.set_ylabel("validation loss (nats/token)")
    bx.set_ylabel("unevenness KL(z ‖ uniform) over the validation split")
    ax.set_title("middle block's FFN: loss (mean, min–max over seeds)")
    bx.set_title("PEER: expert unevenness")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_vs_experts.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=os.path.join(HERE, "runs"))
    parser.add_argument("--plots", default=HERE, help="folder for the PNGs")
    args = parser.parse_args()
    runs, missing = load_runs(args.sweep)
    print_tables(runs, missing)
    plot(runs, args.plots)


if __name__ == "__main__":
    main()
