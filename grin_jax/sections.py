"""Config sections -> frozen config dataclasses, the one way every FFN kind's config is built from an experiment
config (`model.<section>`): unknown keys raise naming the section and its accepted keys; the dataclass validates
its own values. The model's d_model is passed in, never repeated in a section."""

from __future__ import annotations

import dataclasses


def from_section(cls, values, *, d_model: int, section: str):
    """cls(d_model=d_model, **values) for a mapping or ml_collections ConfigDict `values`."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "d_model"]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}: accepted keys are {known}")
    return cls(d_model=d_model, **values)
