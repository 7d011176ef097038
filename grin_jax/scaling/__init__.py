"""Fine-grained MoE scaling (Krajewski et al., arXiv 2402.07871): accounting, the law, its fit, the optimum.

Pure numpy/scipy; nothing here imports JAX or the model code. The function ``flops`` is deliberately not
re-exported here: the name belongs to the submodule (``from grin_jax.scaling import flops`` gives the module;
use ``flops.flops(...)``). fit and optimal are not imported eagerly so ``python -m`` runs them cleanly.

  law.py      Coefficients, PAPER_MOE_E64, PAPER_DENSE, loss(N, D, G, coeffs), dense_loss, to_json/from_json
  flops.py    param_count, active_param_count, flops, tokens_for_budget, fine_grained(d_model, E, G)
  fit.py      fit_law / fit_dense (Huber on log L, logsumexp, BFGS, restarts), bootstrap, the fit command
  optimal.py  compute_optimal(budget, coeffs) (Brent over d_model per power-of-two G), the Table 2 command
  summary.py  summary_columns(model_config, counts, tokens_seen, loss=...): the law's columns of a run's summary.json
"""
from grin_jax.scaling.flops import (
    C_F,
    C_R,
    FineGrained,
    active_param_count,
    fine_grained,
    flops_per_token,
    param_count,
    router_param_count,
    tokens_for_budget,
)
from grin_jax.scaling.law import PAPER_DENSE, PAPER_MOE_E64, Coefficients, dense_loss, from_json, loss, to_json
from grin_jax.scaling.summary import granularity_of, paper_flops_per_token, summary_columns

__all__ = [
    "C_F",
    "C_R",
    "Coefficients",
    "FineGrained",
    "PAPER_DENSE",
    "PAPER_MOE_E64",
    "active_param_count",
    "dense_loss",
    "fine_grained",
    "flops_per_token",
    "from_json",
    "granularity_of",
    "loss",
    "paper_flops_per_token",
    "param_count",
    "router_param_count",
    "summary_columns",
    "to_json",
    "tokens_for_budget",
]
