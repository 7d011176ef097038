"""Tables for the granularity sweep: loss by size x G (mean ± half-range over seeds), the gain of each G over
G = 1 against the seed noise, the dense baselines, throughput; and the MoE / dense rows split into their own CSVs
for `python -m grin_jax.scaling.fit --table` (the fitter reads N, D, G, loss and knows nothing of ffn).

    python experiments/granularity/analyze.py [--sweep experiments/granularity/runs] > experiments/granularity/tables.md
"""

import argparse
import collections
import csv
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    columns = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def mean_spread(values):
    v = np.asarray(values, float)
    return v.mean(), (v.max() - v.min()) / 2 if v.size > 1 else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default=os.path.join(HERE, "runs"))
    parser.add_argument("--out", default=HERE, help="where results_moe.csv / results_dense.csv go")
    args = parser.parse_args(argv)
    rows = read_rows(os.path.join(args.sweep, "results.csv"))
    done = [r for r in rows if r.get("status") == "done"]
    for r in done:
        # The law's N (the paper's): experts + attention = d^2 (8E + 4) per block (dense: 12 d^2), without the
        # router (d E G per block, which grows with G) and the norms that the trainer's N (non-embedding) includes.
        r["N_trainer"] = r["N"]
        r["N"] = str(int(float(r["params.attention"]) + float(r["params.experts"]) + float(r["params.dense_ffn"])))
        val_path = os.path.join(args.sweep, "trials", r["trial"], "val_full.json")  # evaluate.py
        if os.path.exists(val_path):
            with open(val_path) as f:
                r["val_loss_long"] = json.load(f)["loss"]
    moe = [r for r in done if r["model.ffn"] == "moe"]
    dense = [r for r in done if r["model.ffn"] == "dense"]
    write_rows(os.path.join(args.out, "results_moe.csv"), moe)
    write_rows(os.path.join(args.out, "results_dense.csv"), dense)
    with_val = [dict(r, loss=r["val_loss_long"]) for r in moe if "val_loss_long" in r]
    if with_val:  # the same law fitted to the long validation loss (robustness check)
        write_rows(os.path.join(args.out, "results_moe_val.csv"), with_val)
    # Seed means per (N, D, G): the seed (= data order) shifts every variant's loss together by up to 0.8 nats here,
    # which swamps the G effect in a fit over single runs; in the means every point carries the same seed mix.
    for name, rs in (("results_moe_mean.csv", moe), ("results_moe_val_mean.csv", with_val)):
        cells = collections.defaultdict(list)
        for r in rs:
            cells[(r["N"], r["D"], r["G"])].append(r)
        means = [{"N": n, "D": d, "G": g, "loss": float(np.mean([float(r["loss"]) for r in group])),
                  "flops": float(np.mean([float(r["flops"]) for r in group])), "seeds": len(group),
                  "status": "done"} for (n, d, g), group in sorted(cells.items(), key=lambda kv: [float(x) for x in kv[0]])]
        if means:
            write_rows(os.path.join(args.out, name), means)
    print(f"{len(done)}/{len(rows)} trials done ({len(moe)} MoE, {len(dense)} dense); "
          f"not done: {[r['trial'] for r in rows if r.get('status') != 'done']}\n")

    sizes = sorted({int(r["model.d_model"]) for r in done})
    gs = sorted({int(r["model.granularity"]) for r in moe})
    by = collections.defaultdict(list)
    for r in done:
        by[(int(r["model.d_model"]), r["model.ffn"], int(r["model.granularity"]))].append(r)

    def cell(rs, key="loss"):
        rs = [r for r in rs if r.get(key) not in (None, "")]
        if not rs:
            return "–"
        m, s = mean_spread([float(r[key]) for r in rs])
        return f"{m:.4f} ± {s:.4f}" + ("" if len(rs) == 2 else f" (n={len(rs)})")

    for key, title in (("loss", "smoothed final train loss (nats/byte; the law's `loss`)"),
                       ("val_loss_long", "validation loss on 98k held-out tokens (nats/byte; evaluate.py)"),
                       ("validation_loss", "trainer's end-of-run validation loss, 16k tokens (nats/byte)")):
        print(f"### {title}: mean ± half-range over seeds\n")
        print("| d_model | N (MoE, non-emb.) | " + " | ".join(f"G={g}" for g in gs) + " | dense (N) |")
        print("|---|---|" + "---|" * (len(gs) + 1))
        for d in sizes:
            n_moe = next((f"{int(r['N']):,}" for r in moe if int(r["model.d_model"]) == d), "?")
            n_dense = next((f"{int(r['N']):,}" for r in dense if int(r["model.d_model"]) == d), "?")
            cells = [cell(by[(d, "moe", g)], key) for g in gs]
            print(f"| {d} | {n_moe} | " + " | ".join(cells) + f" | {cell(by[(d, 'dense', 1)], key)} (N={n_dense}) |")
        print()

    for key, what in (("loss", "train loss"), ("val_loss_long", "98k-token validation loss")):
        print(f"### gain over G = 1 ({what}; seed 0 / seed 1 (mean)); seed noise = mean over G of "
              "|seed 0 - seed 1|\n")
        print("| d_model | " + " | ".join(f"G={g}: L(1) - L(G)" for g in gs[1:])
              + " | L(dense) - L(G=1) | seed noise |")
        print("|---|" + "---|" * (len(gs) + 1))
        for d in sizes:
            val = lambda rs: {int(r["train.seed"]): float(r[key]) for r in rs if r.get(key) not in (None, "")}
            base = val(by[(d, "moe", 1)])
            cells = []
            for g in gs[1:] + ["dense"]:
                vals = val(by[(d, "dense", 1)] if g == "dense" else by[(d, "moe", g)])
                diffs = [(vals[s] - base[s]) if g == "dense" else (base[s] - vals[s]) for s in sorted(vals)
                         if s in base]
                cells.append(" / ".join(f"{x:+.4f}" for x in diffs) + (f" ({np.mean(diffs):+.4f})" if diffs else "–"))
            noise = [abs(v[0] - v[1]) for v in (val(by[(d, "moe", g)]) for g in gs) if len(v) == 2]
            print(f"| {d} | " + " | ".join(cells) + (f" | {np.mean(noise):.4f} |" if noise else " | – |"))
        print()

    print("### throughput and cost (mean over seeds; shared 2-core CPU, noisy)\n")
    print("| d_model | variant | tokens/s | wall s | paper FLOPs/token | XLA FLOPs/token (train step) | dropped frac. |")
    print("|---|---|---|---|---|---|---|")
    for d in sizes:
        for ffn, g in [("moe", g) for g in gs] + [("dense", 1)]:
            rs = by[(d, ffn, g)]
            if not rs:
                continue
            mean = lambda k: np.mean([float(r[k]) for r in rs if r.get(k) not in (None, "")] or [np.nan])
            print(f"| {d} | {ffn} G={g} | {mean('tokens_per_second'):,.0f} | {mean('wall_seconds'):.0f} | "
                  f"{mean('paper_flops_per_token'):,.0f} | {mean('xla_flops_per_token'):,.0f} | "
                  f"{_dropped(args.sweep, rs)} |")
    return 0


def _dropped(sweep, rs):
    """Mean over seeds of the last logged train/moe/dropped_fraction (tokens no expert took)."""
    vals = []
    for r in rs:
        path = os.path.join(sweep, "trials", r["trial"], "metrics.jsonl")
        if not os.path.exists(path):
            continue
        last = None
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("train/moe/dropped_fraction") is not None:
                    last = rec["train/moe/dropped_fraction"]
        if last is not None:
            vals.append(last)
    return f"{np.mean(vals):.3f}" if vals else "–"


if __name__ == "__main__":
    sys.exit(main())
