"""grin_jax.scaling: the fine-grained MoE law, FLOP accounting, the fit and the compute-optimal search.

Paper numbers (Krajewski et al., arXiv 2402.07871, Table 2) are reproduced from the published coefficients (see
docs/fine_grained.md#the-papers-table-2-and-how-close-we-are); the fitter is checked on synthetic data drawn from the
law. Pure numpy/scipy, no JAX.
"""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from grin_jax.scaling import fit as fit_mod
from grin_jax.scaling import flops as fl
from grin_jax.scaling import optimal
from grin_jax.scaling.law import PAPER_DENSE, PAPER_MOE_E64, Coefficients, dense_loss, from_json, loss, to_json

# Paper Table 2: (FLOP budget, active params as printed "64 x <active>", D, G, predicted loss).
TABLE2 = [
    (2.95e18, 100e6, 4.37e9, 8, 3.133),
    (1.93e20, 1e9, 28.94e9, 16, 2.491),
    (1.41e21, 3e9, 72.90e9, 16, 2.245),
]


# ----------------------------------------------------------------------------------------------------- law


def test_law_values_and_broadcasting():
    k = PAPER_MOE_E64
    N, D, G = 1e9, 1e10, 8.0
    expected = 0.47 + (2.1 / 8**0.58 + 18.1) / 1e9**0.115 + 30.8 / 1e10**0.147
    assert loss(N, D, G, k) == pytest.approx(expected, rel=1e-12)
    out = loss(np.array([1e8, 1e9])[:, None], 1e10, np.array([1, 2, 4, 8]), k)
    assert out.shape == (2, 4)
    assert np.all(np.diff(out, axis=1) < 0), "loss falls with G at fixed N, D"
    assert np.all(np.diff(out, axis=0) < 0), "loss falls with N"
    # the dense law is the MoE law with g = 0
    assert dense_loss(N, D, PAPER_DENSE) == pytest.approx(loss(N, D, 3.0, PAPER_DENSE))
    assert PAPER_DENSE.is_dense and not PAPER_MOE_E64.is_dense


def test_coefficients_json_roundtrip(tmp_path):
    p = tmp_path / "k.json"
    text = to_json(PAPER_MOE_E64, p, note="x")
    assert json.loads(text)["note"] == "x"
    assert from_json(p) == PAPER_MOE_E64
    assert from_json(text) == PAPER_MOE_E64
    assert from_json(json.dumps(PAPER_DENSE.to_dict())) == PAPER_DENSE


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: loss(-1.0, 1e9, 1, PAPER_MOE_E64), "N"),
        (lambda: loss(1e9, 0.0, 1, PAPER_MOE_E64), "D"),
        (lambda: loss(1e9, 1e9, 0, PAPER_MOE_E64), "G"),
        (lambda: Coefficients(a=-1, alpha=0.1, b=1, beta=0.1), "Coefficients.a"),
        (lambda: Coefficients(a=1, alpha=float("nan"), b=1, beta=0.1), "Coefficients.alpha"),
        (lambda: Coefficients.from_dict({"a": 1, "alpha": 0.1, "b": 1}), "beta"),
        (lambda: Coefficients.from_dict({"a": 1, "alpha": 0.1, "b": 1, "beta": 1, "zeta": 1}), "zeta"),
        (lambda: from_json("/nonexistent/coeffs.json"), "coefficients"),
    ],
)
def test_law_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --------------------------------------------------------------------------------------------- accounting


def test_param_and_flop_accounting():
    d, n, E, G = 512, 8, 64, 8
    assert fl.param_count(d, n, E) == d * d * (8 * E + 4) * n
    assert fl.active_param_count(d, n) == 12 * d * d * n
    assert fl.router_param_count(d, n, E, G) == d * E * G * n
    # one token through one block: 6 FLOPs per active param + 14 per router param
    assert fl.flops_per_token(d, 1, E, G) == 6 * 12 * d * d + 14 * d * E * G
    assert fl.flops(d, n, E, G, 1e9) == pytest.approx((12 * d * d * 6 + d * E * G * 14) * 1e9 * n)
    D = fl.tokens_for_budget(1e18, d, n, E, G)
    assert fl.flops(d, n, E, G, D) == pytest.approx(1e18)
    # inverse of N = d^2 (8E+4) d / 64
    d2, n2 = fl.d_model_from_params(fl.param_count(d, d / 64, E), E)
    assert d2 == pytest.approx(d) and n2 == pytest.approx(d / 64)


@pytest.mark.parametrize("flops_budget, active, D, G, _", TABLE2)
def test_paper_table2_flops_formula(flops_budget, active, D, G, _):
    """The paper's printed rows (active N, D, G) give the printed FLOPs under F = (72 d² + 14 d E G)·D·n_blocks,
    with d_model = 64·n_blocks; the router term is needed (without it row 1 is 11 % low)."""
    n = (active / 12 / 64**2) ** (1 / 3)  # 12 d² n = active, d = 64 n
    d = 64 * n
    assert fl.flops(d, n, 64, G, D) == pytest.approx(flops_budget, rel=0.05)
    if G == 8:
        assert fl.flops(d, n, 64, G, D, c_r=0) < 0.9 * flops_budget


def test_fine_grained_parametrisation():
    cfg = fl.fine_grained(d_model=256, expansion_rate=8, granularity=4)
    assert (cfg.num_experts, cfg.expert_width, cfg.top_k, cfg.d_ff) == (32, 256, 4, 1024)
    # active expert params = G experts x 2 d (4d/G) = 8 d^2: independent of G
    for G in (1, 2, 4, 8, 16):
        c = fl.fine_grained(256, 8, G)
        assert c.top_k * 2 * c.d_model * c.expert_width == 8 * 256**2
        assert c.num_experts * 2 * c.d_model * c.expert_width == 8 * 8 * 256**2
    assert fl.fine_grained(64, 0.5, 2).num_experts == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(d_model=100, expansion_rate=8, granularity=32), "granularity"),  # 400 % 32 != 0
        (dict(d_model=128, expansion_rate=0.5, granularity=1), "expansion_rate"),  # half an expert
        (dict(d_model=128, expansion_rate=-1, granularity=1), "expansion_rate"),
        (dict(d_model=0, expansion_rate=8, granularity=1), "d_model"),
        (dict(d_model=128.5, expansion_rate=8, granularity=1), "d_model"),
        (dict(d_model=128, expansion_rate=8, granularity=0), "granularity"),
    ],
)
def test_fine_grained_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fl.fine_grained(**kwargs)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: fl.flops(512, 8, 64, 8, -1), "tokens"),
        (lambda: fl.param_count(512, 0, 64), "n_blocks"),
        (lambda: fl.flops_per_token(512, 8, 64, 0), "granularity"),
        (lambda: optimal.compute_optimal(-1.0), "flops"),
        (lambda: optimal.compute_optimal(1e20, granularities=[0]), "granularities"),
        (lambda: optimal.compute_optimal(1e20, expansion_rate=0), "expansion_rate"),
    ],
)
def test_accounting_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# -------------------------------------------------------------------------------------- compute-optimal


@pytest.mark.parametrize("budget, active, D, G, paper_loss", TABLE2)
def test_paper_table2_compute_optimal(budget, active, D, G, paper_loss):
    """Table 2 from the rounded published coefficients: G exactly, D / FLOPs / active N within 5 %.

    Reproduces with N = total params d²(8E+4)·n_blocks in the law and the router term in the FLOPs
    (measured: D 2.2 % low, loss 0.8 % low — the coefficients are rounded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an optimum at a search bound or at the largest G would fail here
        a = optimal.compute_optimal(budget, PAPER_MOE_E64, expansion_rate=64)
    assert a.granularity == G
    assert a.tokens == pytest.approx(D, rel=0.05)
    assert a.active_params == pytest.approx(active, rel=0.05)
    assert a.loss == pytest.approx(paper_loss, rel=0.01)
    assert a.d_model == pytest.approx(64 * a.n_blocks)
    assert a.params == pytest.approx(fl.param_count(a.d_model, a.n_blocks, 64))
    # the allocation spends the budget
    assert fl.flops(a.d_model, a.n_blocks, 64, a.granularity, a.tokens) == pytest.approx(budget, rel=1e-9)
    assert not a.at_bound


def test_compute_optimal_is_a_minimum():
    budget = 1.93e20
    best = optimal.compute_optimal(budget)
    for G in (best.granularity // 2, best.granularity * 2):
        assert optimal.optimal_for_granularity(budget, G).loss > best.loss
    for scale in (0.9, 1.1):  # perturb d_model at the optimum's G
        d = best.d_model * scale
        n = d / 64
        L = loss(fl.param_count(d, n, 64), fl.tokens_for_budget(budget, d, n, 64, best.granularity),
                 best.granularity)
        assert L > best.loss


def test_without_router_cost_granularity_runs_away():
    """Documents the reading: dropping the c_r term makes the largest G always win (Table 2 needs it)."""
    scan = optimal.scan_granularities(2.95e18, c_r=0.0)
    assert min(scan, key=lambda a: a.loss).granularity == max(optimal.DEFAULT_GRANULARITIES)


# ------------------------------------------------------------------------------------------------ fitting


def _synthetic(coeffs, n=100, noise=0.01, seed=0, dense=False):
    """~n points, log-uniform N in 1e7..1e10, D in 1e9..1e11, G in {1..32}; multiplicative lognormal noise."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(math.log(1e7), math.log(1e10), n))
    D = np.exp(rng.uniform(math.log(1e9), math.log(1e11), n))
    G = np.ones(n) if dense else 2.0 ** rng.integers(0, 6, n)
    L = loss(N, D, G, coeffs) * np.exp(noise * rng.standard_normal(n))
    return N, D, G, L


def _errors(k, truth):
    return dict(
        a=k.a / truth.a - 1, alpha=k.alpha - truth.alpha, log_b=math.log(k.b / truth.b), beta=k.beta - truth.beta,
        g=(k.g / truth.g - 1) if truth.g else 0.0, gamma=k.gamma - truth.gamma, c=k.c - truth.c,
    )


# Tolerances ~4 standard deviations of the estimator, measured over 40 seeds of this design
# (a, g relative; log_b on log scale; exponents and c absolute). The design identifies b, beta and g weakly:
# at 1 % noise the spread of log b is 0.32 and of beta 0.02, so those bounds are wide.
TOL_SMALL_NOISE = dict(a=0.04, alpha=0.004, log_b=0.15, beta=0.01, g=0.1, gamma=0.05, c=0.1)     # noise 0.1 %
TOL_ONE_PERCENT = dict(a=0.35, alpha=0.035, log_b=1.3, beta=0.08, g=0.9, gamma=0.45, c=0.9)      # noise 1 %


@pytest.mark.parametrize("c", [0.47, None], ids=["c_fixed", "c_free"])
@pytest.mark.parametrize("noise, tol", [(0.001, TOL_SMALL_NOISE), (0.01, TOL_ONE_PERCENT)], ids=["0.1%", "1%"])
def test_fit_recovers_known_coefficients(c, noise, tol):
    truth = PAPER_MOE_E64
    N, D, G, L = _synthetic(truth, noise=noise)
    res = fit_mod.fit_law(N, D, G, L, c=c, n_starts=4)
    err = _errors(res.coeffs, truth)
    bad = {k: v for k, v in err.items() if abs(v) > tol[k]}
    assert not bad, f"errors {err} exceed tolerances {tol}"
    assert res.c_fixed == (c is not None) and res.n_points == 100
    assert res.rmse_log == pytest.approx(noise, rel=0.3)
    if c is not None:
        assert res.coeffs.c == c


def test_fit_noise_free_is_exact():
    """Without noise and without weight decay the fit returns the generating coefficients; the default decay
    (1e-6 on the raw parameters) biases the weakly identified directions slightly (measured: log b -0.018,
    c -0.008 with c free), far below the spread that 0.1 % noise already causes."""
    N, D, G, L = _synthetic(PAPER_MOE_E64, noise=0.0, n=60)
    err = _errors(fit_mod.fit_law(N, D, G, L, c=None, n_starts=2, weight_decay=0.0).coeffs, PAPER_MOE_E64)
    assert max(abs(v) for v in err.values()) < 1e-5, err
    err = _errors(fit_mod.fit_law(N, D, G, L, c=None, n_starts=2).coeffs, PAPER_MOE_E64)
    assert max(abs(v) for v in err.values()) < 0.03, err


def test_fit_dense_law():
    N, D, _, L = _synthetic(PAPER_DENSE, noise=0.001, dense=True)
    res = fit_mod.fit_dense(N, D, L, n_starts=4)
    assert res.law == "dense" and res.coeffs.g == 0.0 and res.coeffs.gamma == 0.0
    err = _errors(res.coeffs, PAPER_DENSE)
    assert abs(err["alpha"]) < 0.004 and abs(err["beta"]) < 0.01
    assert abs(err["a"]) < 0.05 and abs(err["log_b"]) < 0.15


def test_bootstrap_intervals_contain_truth():
    """95 % percentile intervals (60 resamples) at 1 % noise contain every true coefficient for this seed.
    (Across 12 seeds the per-coefficient coverage measured ~0.9, so this is a check with a fixed seed.)"""
    N, D, G, L = _synthetic(PAPER_MOE_E64, noise=0.01, seed=0)
    point = fit_mod.fit_law(N, D, G, L, n_starts=4)
    boot = fit_mod.bootstrap(N, D, G, L, n_boot=60, n_starts=0, seed=0, point=point)
    assert set(boot.intervals) == {"a", "alpha", "b", "beta", "g", "gamma"}  # c was fixed
    for name, (lo, hi) in boot.intervals.items():
        truth = getattr(PAPER_MOE_E64, name)
        est = getattr(point.coeffs, name)
        assert lo < hi
        assert lo <= truth <= hi, f"{name}: truth {truth} outside [{lo}, {hi}]"
        assert lo <= est <= hi


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda d: fit_mod.fit_law(*d, c=-1.0), "c"),
        (lambda d: fit_mod.fit_law(*d, delta=0.0), "delta"),
        (lambda d: fit_mod.fit_law(*d, n_starts=0), "n_starts"),
        (lambda d: fit_mod.fit_law(d[0], d[1], d[2][:5], d[3]), "expected equal lengths"),
        (lambda d: fit_mod.fit_law(d[0] * 0, d[1], d[2], d[3]), "N"),
        (lambda d: fit_mod.fit_law(d[0][:3], d[1][:3], d[2][:3], d[3][:3]), "loss"),
        (lambda d: fit_mod.bootstrap(*d, n_boot=1), "n_boot"),
        (lambda d: fit_mod.bootstrap(*d, confidence=1.5), "confidence"),
        (lambda d: fit_mod.fit_law(*d, init_grid=np.zeros((3, 2))), "init_grid"),
    ],
)
def test_fit_bad_arguments(call, name):
    data = _synthetic(PAPER_MOE_E64, n=20)
    with pytest.raises(ValueError, match=name):
        call(data)


# ------------------------------------------------------------------------------------------------ commands


def _write_sweep(path, noise=0.005):
    rng = np.random.default_rng(1)
    rows = ["trial,N,D,G,loss,status"]
    for N in (1e7, 1e8, 1e9):
        for D in (1e9, 1e10):
            for G in (1, 2, 4, 8, 16):
                L = loss(N, D, G, PAPER_MOE_E64) * math.exp(noise * rng.standard_normal())
                rows.append(f"run-{N:g}-{D:g}-{G},{N:g},{D:g},{G},{L:.6f},done")
    rows.append("run-failed,1e9,1e10,32,,failed")  # sweep-runner rows that did not finish are skipped
    path.write_text("\n".join(rows) + "\n")


def test_fit_cli_writes_coefficients_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _write_sweep(sweep / "results.csv")
    out = tmp_path / "coeffs.json"
    plots = tmp_path / "plots"
    fit_mod.main([f"--sweep={sweep}", "--out", str(out), "--plots", str(plots), "--bootstrap", "8", "--starts", "2"])
    data = json.loads(out.read_text())
    k = from_json(out)
    assert k.c == 0.47 and 0.05 < k.alpha < 0.2
    assert data["fit"]["law"] == "moe" and data["fit"]["n_points"] == 30
    assert set(data["bootstrap"]["intervals"]) == {"a", "alpha", "b", "beta", "g", "gamma"}
    for name in ("loss_vs_granularity.png", "loss_vs_flops.png", "optimum.png"):
        p = plots / name
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    # dense law, c free, no bootstrap, from --table
    out2 = tmp_path / "dense.json"
    fit_mod.main(["--table", str(sweep / "results.csv"), "--out", str(out2), "--law", "dense", "--free-c",
                  "--bootstrap", "0", "--starts", "2", "--plots", str(tmp_path / "dense_plots")])
    d2 = json.loads(out2.read_text())
    assert d2["fit"]["law"] == "dense" and not d2["fit"]["c_fixed"] and "bootstrap" not in d2
    assert [os.path.basename(p) for p in d2["plots"]] == ["loss_vs_flops.png"]


def _write_mixed_sweep(path):
    """A sweep table with MoE rows (the law, G in model.moe.granularity) and dense rows whose G column reads 1."""
    rng = np.random.default_rng(2)
    rows = ["trial,model.layout,model.moe.granularity,train.seed,N,D,G,loss,status"]
    for N in (1e7, 1e8, 1e9):
        for D in (1e9, 1e10):
            for G in (1, 2, 4, 8):
                L = loss(N, D, G, PAPER_MOE_E64) * math.exp(0.005 * rng.standard_normal())
                rows.append(f"t-{len(rows):08x},moe,{G},0,{N:g},{D:g},{G},{L:.6f},done")
            rows.append(f"t-{len(rows):08x},dense,,0,{N:g},{D:g},1,{3 * loss(N, D, 1, PAPER_MOE_E64):.6f},done")
    rows.append(f"t-{len(rows):08x},moe,16,0,1e9,1e10,16,,failed")
    path.write_text("\n".join(rows) + "\n")


def test_fit_where_selects_rows_and_reports_what_it_dropped(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _write_mixed_sweep(sweep / "results.csv")
    args = [f"--sweep={sweep}", "--out", str(tmp_path / "c.json"), "--bootstrap", "0", "--starts", "2"]
    # Mixed FFN kinds and no filter: refused (the dense rows would be read as G = 1).
    with pytest.raises(ValueError, match=r"mixes model.layout values \['dense', 'moe'\].*--where model.layout"):
        fit_mod.main(args)
    data = fit_mod.main(args + ["--where", "model.layout=moe"])
    assert data["fit"]["n_points"] == 24
    assert data["selection"] == {"rows_read": 31, "rows_kept": 24, "where": ["model.layout=moe"], "dropped": {
        "status=failed (not done)": 1, "model.layout=dense (--where model.layout=moe)": 6}}
    err = capsys.readouterr().err
    assert "24 of 31 rows selected (--where model.layout=moe)" in err
    assert "dropped 6 rows: model.layout=dense (--where model.layout=moe)" in err
    assert "dropped 1 row: status=failed (not done)" in err
    k = from_json(tmp_path / "c.json")
    assert 0.05 < k.alpha < 0.2
    # Repeatable; numbers match numerically; != excludes.
    table, selection = fit_mod.read_selected(sweep / "results.csv", where=[
        "model.layout=moe", "model.moe.granularity!=8", "train.seed=0.0"])
    assert table["N"].size == 18 and set(table["G"]) == {1.0, 2.0, 4.0}
    assert selection["dropped"]["model.moe.granularity=8 (--where model.moe.granularity!=8)"] == 6
    dense = fit_mod.read_table(sweep / "results.csv", dense=True, where=["model.layout=dense"])
    assert dense["N"].size == 6
    with pytest.raises(ValueError, match="no column 'model.ffn'"):
        fit_mod.main(args + ["--where", "model.ffn=moe"])
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        fit_mod.main(args + ["--where", "model.layout"])
    with pytest.raises(ValueError, match="no \\(finished, selected\\) data rows"):
        fit_mod.main(args + ["--where", "model.layout=peer"])


def test_fit_cli_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="table"):
        fit_mod.main(["--table", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o.json")])
    with pytest.raises(ValueError, match="sweep"):
        fit_mod.main(["--sweep", str(tmp_path / "nodir"), "--out", str(tmp_path / "o.json")])
    bad = tmp_path / "bad.csv"
    bad.write_text("N,D,loss\n1e9,1e10,3.0\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['G'\]"):
        fit_mod.main(["--table", str(bad), "--out", str(tmp_path / "o.json")])
    bad.write_text("N,D,G,loss\n1e9,1e10,2,abc\n")
    with pytest.raises(ValueError, match="loss"):
        fit_mod.main(["--table", str(bad), "--out", str(tmp_path / "o.json")])
    with pytest.raises(ValueError, match="--bootstrap"):
        fit_mod.main(["--table", str(bad), "--out", str(tmp_path / "o.json"), "--bootstrap", "1"])


def test_optimal_cli_table_and_json(tmp_path, capsys):
    allocs = optimal.main(["--flops", "2.95e18", "1.93e20", "1.41e21"])
    text = capsys.readouterr().out
    assert [a.granularity for a in allocs] == [8, 16, 16]
    assert "64 x 103M" in text and "| 16 |" in text
    coeffs = tmp_path / "k.json"
    to_json(PAPER_MOE_E64, coeffs)
    proc = subprocess.run(
        [sys.executable, "-m", "grin_jax.scaling.optimal", "--flops", "2.95e18", "--json", "--coefficients",
         str(coeffs), "--expansion", "64"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    data = json.loads(proc.stdout)
    (a,) = data["allocations"]
    assert a["granularity"] == 8 and a["flops"] == 2.95e18
    assert a["tokens"] == pytest.approx(4.37e9, rel=0.05)
    assert set(a["loss_by_granularity"]) == {str(g) for g in optimal.DEFAULT_GRANULARITIES}


def test_optimal_cli_bad_arguments():
    with pytest.raises(ValueError, match="--flops"):
        optimal.main(["--flops", "-1"])
    with pytest.raises(ValueError, match="--expansion"):
        optimal.main(["--flops", "1e20", "--expansion", "0"])
    with pytest.raises(ValueError, match="--granularities"):
        optimal.main(["--flops", "1e20", "--granularities", "0", "2"])
