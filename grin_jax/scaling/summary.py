"""The scaling-law columns of a training run's summary.json (what ``python -m grin_jax.scaling.fit`` reads).

The trainer calls ``summary_columns`` and writes what it returns, without knowing the law: the FLOP constants
(c_f, c_r: ``flops.C_F``, ``flops.C_R``; see docs/fine_grained.md#flop-accounting), what N counts and what G is
live here.

    paper_flops_per_token   c_f per active non-embedding parameter (routers excluded) + c_r per router parameter
    N                       non-embedding parameters without routers and norms (d²(8E+4) per block)
    D                       training tokens seen
    G                       the granularity of the model's MoE (1 when it has none)
    loss                    the run's loss for the fit (the trainer passes its smoothed train loss)
    flops                   paper_flops_per_token · D

Pure Python: ``counts`` is the parameter count dict of ``grin_jax.params.count_params`` (keys 'non_embedding',
'active_non_embedding', and per component, e.g. 'router', 'norms').
"""
from __future__ import annotations

from collections.abc import Mapping

from grin_jax.scaling.flops import C_F, C_R

__all__ = ["granularity_of", "paper_flops_per_token", "summary_columns"]


def _field(obj, name: str):
    """obj[name] / obj.name, or None (mappings, ml_collections.ConfigDict and dataclasses alike)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return getattr(obj, name)
    except (AttributeError, KeyError):
        return None


def granularity_of(model_config) -> int:
    """G of a model config (the config file's ``model`` section or a resolved ModelConfig):
    ``model.moe.granularity``, else ``model.granularity``, else 1 (dense, or not set)."""
    moe = _field(model_config, "moe")
    if moe is None:  # a resolved ModelConfig keeps its FFN sections as (name, kind config) pairs
        moe = dict(_field(model_config, "sections") or ()).get("moe")
    for value in (_field(moe, "granularity"), _field(model_config, "granularity")):
        if value:
            return int(value)
    return 1


def paper_flops_per_token(model_config, counts: Mapping) -> float:
    """Krajewski et al.'s training FLOPs per token: c_f per active non-embedding parameter (router excluded) plus
    c_r per router parameter; attention scores and the LM head are not counted. (model_config: unused, kept for
    callers that pass it.)"""
    router = counts.get("router", 0)
    return C_F * (counts["active_non_embedding"] - router) + C_R * router


def summary_columns(model_config, counts: Mapping, tokens_seen: int, *, loss: float | None) -> dict:
    """{'paper_flops_per_token', 'N', 'D', 'G', 'loss', 'flops'} of a run (see the module docstring)."""
    per_token = paper_flops_per_token(model_config, counts) if counts else None
    return {
        "paper_flops_per_token": per_token,
        "N": counts["non_embedding"] - counts.get("router", 0) - counts.get("norms", 0),
        "D": int(tokens_seen),
        "G": granularity_of(model_config),
        "loss": loss,
        "flops": per_token * tokens_seen if per_token is not None else None,
    }
