"""Router-gradient estimator study: writes results.json and tables.md, and refreshes the tables in README.md.

    python experiments/estimators/run.py --out experiments/estimators

Every number comes from grin_jax/studies/router_gradients.py (definitions in its docstring and in
docs/router_gradients.md). float64 throughout. Exact moments (enumeration) for sparsemixer_v2, sparsemixer_v2_star and
gshard; Monte Carlo (--mc_samples draws per problem) for st_gumbel and reinforce. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # this is a script: float64 for the whole run

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grin_jax.studies import router_gradients as rg  # noqa: E402

EPS_GRID = (0.01, 0.05, 0.2, 0.5, math.inf)
SCALES = (0.1, 0.5, 1.0, 2.0, 4.0)
METRICS = rg.STUDY_METRICS
README_BEGIN = "<!-- BEGIN run.py tables (do not edit by hand) -->"
README_END = "<!-- END run.py tables -->"


def configs(tau: float, num_inner: int):
    """(label, estimator name, Settings) rows of the study."""
    rows = []
    for name in rg.MASKED:
        for eps in EPS_GRID:
            rows.append((f"{name} eps={_eps(eps)}", name, rg.Settings(jitter_eps=eps)))
    rows.append(("gshard", "gshard", rg.Settings()))
    rows.append((f"st_gumbel tau={tau:g}", "st_gumbel", rg.Settings(tau=tau)))
    rows.append((f"reinforce n={num_inner}", "reinforce", rg.Settings(num_inner=num_inner)))
    return rows


def _eps(eps):
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run(args):
    root = jax.random.key(args.seed)
    # Problems: the same for every estimator; N = problems per scale, stacked over the scales.
    per_scale = [rg.make_problems(jax.random.fold_in(root, i), args.problems, num_experts=args.experts,
                                  scale=s, dtype=jnp.float64) for i, s in enumerate(SCALES)]
    problems = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *per_scale)
    num = args.problems * len(SCALES)
    keys = jax.random.split(jax.random.fold_in(root, 1000), num)
    cells = []
    for head in rg.HEADS:
        for top_k in (1, 2):
            for label, name, settings in configs(args.tau, args.num_inner):
                t0 = time.time()
                out = rg.study_metrics(name, problems, keys, head=head, top_k=top_k, settings=settings,
                                       mc_samples=args.mc_samples)
                out = {k: v.reshape(len(SCALES), args.problems) for k, v in out.items()}
                for i, s in enumerate(SCALES):
                    cells.append({"head": head, "top_k": top_k, "scale": s, "estimator": name, "label": label,
                                  "jitter_eps": _eps(settings.jitter_eps) if name in rg.MASKED else None,
                                  "mean": {m: _r(_nanmean(out[m][i])) for m in METRICS},
                                  "median": {m: _r(_nanmedian(out[m][i])) for m in METRICS}})
                print(f"{head} top-{top_k} {label:32s} {time.time() - t0:5.1f}s", flush=True)
    candidates = []
    for num_experts in (8, 16):
        for eps in EPS_GRID[:-1]:
            st = rg.candidate_stats(jax.random.fold_in(root, 2000 + num_experts), num_tokens=args.tokens,
                                    num_experts=num_experts, jitter_eps=eps)
            candidates.append({"num_experts": num_experts, "jitter_eps": eps,
                               "grad_fraction": _r(st["grad_fraction"]),
                               "mean_slot1_candidates": _r(st["mean_slot1_candidates"]),
                               "slot1_hist": [_r(x) for x in st["slot1_hist"]]})
    return cells, candidates


def _nanmedian(x):
    x = x[~np.isnan(x)]
    return np.median(x) if x.size else math.nan


def _nanmean(x):
    x = x[~np.isnan(x)]
    return np.mean(x) if x.size else math.nan


def _r(x):
    x = float(x)
    return x if not math.isfinite(x) else float(f"{x:.6g}")


def _lookup(cells, **kw):
    for c in cells:
        if all(c[k] == v for k, v in kw.items()):
            return c
    raise KeyError(kw)


def _fmt(x):
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.2e}"


def tables(cells, candidates, args, full: bool):
    labels = [l for l, _, _ in configs(args.tau, args.num_inner)]
    out = []
    # 1. Every metric at s = 1, per (head, top_k).
    for head in rg.HEADS:
        for top_k in (1, 2):
            out.append(f"\n**{head} head, top-{top_k}, logit scale s = 1** ({args.problems} problems; cosines: mean, "
                       "ratios: median; reference: the gradient of the estimator's own objective without mask)\n")
            out.append("| estimator | cos | bias | var | norm ratio | noise / signal | error vs own masked objective "
                       "| cos vs J_1 |")
            out.append("|---|---|---|---|---|---|---|---|")
            for label in labels:
                c = _lookup(cells, head=head, top_k=top_k, scale=1.0, label=label)
                m = {k: c["mean" if k.startswith("cos") else "median"][k] for k in METRICS}
                floor = f" (MC floor {_fmt(m['bias_floor'])})" if m["bias_floor"] > 0 else ""
                out.append(f"| {label} | {_fmt(m['cos'])} | {_fmt(m['bias'])}{floor} | {_fmt(m['var'])} | "
                           f"{_fmt(m['norm_ratio'])} | {_fmt(m['noise'])} | {_fmt(m['bias_masked'])} | "
                           f"{_fmt(m['cos_T1'])} |")
    # 2. Metrics against the logit scale.
    metrics = ("cos", "bias", "var", "norm_ratio", "noise", "bias_masked") if full else ("cos", "bias")
    combos = [(h, k) for h in rg.HEADS for k in (1, 2)] if full else [(h, 2) for h in rg.HEADS]
    for head, top_k in combos:
        for metric in metrics:
            stat = "mean" if metric.startswith("cos") else "median"
            out.append(f"\n**{metric} against the logit scale s: {head} head, top-{top_k}** ({stat} over "
                       f"{args.problems} problems per s)\n")
            out.append("| estimator | " + " | ".join(f"s = {s:g}" for s in SCALES) + " |")
            out.append("|---|" + "---|" * len(SCALES))
            for label in labels:
                vals = [_lookup(cells, head=head, top_k=top_k, scale=s, label=label)[stat][metric] for s in SCALES]
                out.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    # 3. The mask on N(0, 1) logits.
    out.append(f"\n**The mask on z ~ N(0, 1)** ({args.tokens} tokens, the shipped router, top-2)\n")
    out.append("| E | eps | tokens with a router gradient | mean slot-1 candidates "
               "| slot-1 candidates 1 / 2 / 3 / >=4 |")
    out.append("|---|---|---|---|---|")
    for c in candidates:
        h = c["slot1_hist"]
        out.append(f"| {c['num_experts']} | {c['jitter_eps']:g} | {100 * c['grad_fraction']:.2f} % | "
                   f"{c['mean_slot1_candidates']:.3f} | {100 * h[1]:.1f} / {100 * h[2]:.1f} / {100 * h[3]:.1f} / "
                   f"{100 * sum(h[4:]):.1f} % |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/estimators")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems", type=int, default=16, help="random problems per logit scale")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--mc_samples", type=int, default=4000, help="Monte Carlo draws per problem (ST, REINFORCE)")
    parser.add_argument("--tau", type=float, default=1.0, help="straight-through Gumbel-softmax temperature")
    parser.add_argument("--num_inner", type=int, default=2, help="REINFORCE tuples per estimate (LOO baseline)")
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens for the candidates-per-token table")
    parser.add_argument("--no_readme", action="store_true", help="do not refresh README.md")
    args = parser.parse_args(argv)
    t0 = time.time()
    cells, candidates = run(args)
    elapsed = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    command = "python experiments/estimators/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "args": vars(args), "seconds": round(elapsed, 1), "jax": jax.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "scales": SCALES,
            "jitter_eps": [_eps(e) for e in EPS_GRID]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "cells": cells, "candidates": candidates}, f, indent=1)
    header = (f"# Router-gradient estimators: all tables\n\nWritten by `{meta['command']}` "
              f"({elapsed:.0f} s; jax {jax.__version__}). Definitions: grin_jax/studies/router_gradients.py.\n")
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(header + tables(cells, candidates, args, full=True))
    readme = os.path.join(args.out, "README.md")
    if not args.no_readme and os.path.exists(readme):
        text = open(readme).read()
        if README_BEGIN in text and README_END in text:
            block = (f"{README_BEGIN}\n_Generated by `{meta['command']}` in {elapsed:.0f} s._\n"
                     + tables(cells, candidates, args, full=False) + README_END)
            text = re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _: block, text,
                          flags=re.S)
            with open(readme, "w") as f:
                f.write(text)
    print(f"wrote {args.out}/results.json, tables.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
