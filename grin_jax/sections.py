"""Config sections -> frozen config dataclasses, the one way every FFN kind's config is built from an experiment
config (`model.<section>`, and the attention experts' `model.moa`): unknown keys raise naming the section and its
accepted keys; the dataclass validates its own values. The model's sizes it needs (d_model; num_heads and
num_kv_heads for moa) are passed in, never repeated in a section."""

from __future__ import annotations

import dataclasses


def from_section(cls, values, *, section: str, **model_sizes):
    """cls(**model_sizes, **values) for a mapping or ml_collections ConfigDict `values` (model_sizes: e.g.
    d_model=...)."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = [f.name for f in dataclasses.fields(cls) if f.name not in model_sizes]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}: accepted keys are {known}")
    return cls(**model_sizes, **values)
