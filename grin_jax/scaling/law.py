"""The fine-grained MoE scaling law of Krajewski et al. (arXiv 2402.07871), docs/fine_grained.md#the-law.

    L(N, D, G) = c + (g / G^γ + a) / N^α + b / D^β          (MoE, fixed expansion rate E)
    L(N, D)    = c + a / N^α + b / D^β                      (dense; the MoE law with g = 0)

N is the total number of non-embedding parameters (for the paper's parametrisation
``d_model²·(8E + 4)·n_blocks``, see ``flops.param_count``), D the number of training tokens and G the
granularity (dense FFN width / expert width). ``compute_optimal`` in ``optimal.py`` reproduces the paper's
Table 2 only with N = *total* parameters; with active parameters the optimum moves to G = 16/32/32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

__all__ = [
    "Coefficients",
    "PAPER_MOE_E64",
    "PAPER_DENSE",
    "loss",
    "dense_loss",
    "to_json",
    "from_json",
]

_FIELDS = ("a", "alpha", "b", "beta", "g", "gamma", "c")


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Coefficients of ``L = c + (g/G^gamma + a)/N^alpha + b/D^beta``; ``g = gamma = 0`` is the dense law."""

    a: float
    alpha: float
    b: float
    beta: float
    g: float = 0.0
    gamma: float = 0.0
    c: float = 0.0

    def __post_init__(self):
        for name in _FIELDS:
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Coefficients.{name}={value!r}: expected a real number") from None
            if not math.isfinite(value):
                raise ValueError(f"Coefficients.{name}={value!r}: expected a finite number")
            if name in ("a", "b", "g", "c") and value < 0:
                raise ValueError(f"Coefficients.{name}={value!r}: expected a value >= 0 (the law's terms are positive)")
            object.__setattr__(self, name, value)

    @property
    def is_dense(self) -> bool:
        """True when the granularity term vanishes (g == 0)."""
        return self.g == 0.0

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Coefficients":
        """Build from a mapping; accepts the output of ``to_dict``/``to_json`` or of the fit CLI."""
        if "coefficients" in d and isinstance(d["coefficients"], Mapping):
            d = d["coefficients"]
        missing = [k for k in ("a", "alpha", "b", "beta") if k not in d]
        if missing:
            raise ValueError(f"coefficients: missing key(s) {missing}; expected keys {list(_FIELDS)}")
        unknown = [k for k in d if k not in _FIELDS]
        if unknown:
            raise ValueError(f"coefficients: unknown key(s) {unknown}; expected keys {list(_FIELDS)}")
        return cls(**{k: float(v) for k, v in d.items()})

    def replace(self, **kw) -> "Coefficients":
        return dataclasses.replace(self, **kw)


# docs/fine_grained.md#the-law (paper Table 1 / §4): rounded published coefficients.
PAPER_MOE_E64 = Coefficients(a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47)
PAPER_DENSE = Coefficients(a=16.3, alpha=0.126, b=26.7, beta=0.127, g=0.0, gamma=0.0, c=0.47)


def _positive(name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name}: expected finite values > 0, got {x!r}")
    return arr


def loss(N, D, G=1.0, coeffs: Coefficients = PAPER_MOE_E64):
    """Predicted loss ``c + (g/G^γ + a)/N^α + b/D^β``; N, D, G broadcast (numpy arrays or scalars).

    N: total non-embedding parameters, D: training tokens, G: granularity (> 0).
    Returns a float for scalar inputs, else an ndarray of the broadcast shape.
    """
    N = _positive("N", N)
    D = _positive("D", D)
    G = _positive("G", G)
    k = coeffs
    out = k.c + (k.g * G ** (-k.gamma) + k.a) * N ** (-k.alpha) + k.b * D ** (-k.beta)
    return float(out) if np.ndim(out) == 0 else out


def dense_loss(N, D, coeffs: Coefficients = PAPER_DENSE):
    """Dense law ``c + a/N^α + b/D^β`` (ignores g, γ)."""
    N = _positive("N", N)
    D = _positive("D", D)
    k = coeffs
    out = k.c + k.a * N ** (-k.alpha) + k.b * D ** (-k.beta)
    return float(out) if np.ndim(out) == 0 else out


def to_json(coeffs: Coefficients, path: str | os.PathLike | None = None, **extra) -> str:
    """Serialise as ``{"coefficients": {...}, **extra}``; writes to ``path`` when given; returns the text."""
    payload = {"coefficients": coeffs.to_dict(), **extra}
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


def from_json(source: str | os.PathLike) -> Coefficients:
    """Read coefficients from a JSON file path or a JSON string (flat, or with a "coefficients" key)."""
    text = None
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        if not os.path.exists(source):
            raise ValueError(f"coefficients: no such file {str(source)!r}")
        with open(source) as f:
            text = f.read()
    else:
        text = str(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"coefficients: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError("coefficients: expected a JSON object")
    return Coefficients.from_dict(data)
