"""Latency budget distributions and the budget features a policy sees.

A distribution is given in fractions of the full-config latency of the profile in use (the
default) or in milliseconds; `sample` always returns milliseconds. Names: uniform, log_uniform,
tight, loose, bimodal, and `trace:FILE` (a JSON list of budgets, or {"unit": "ms"|"fraction",
"budgets": [...]}).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULTS = {  # fractions of the full-config latency
    "uniform": {"low": 0.2, "high": 1.2},
    "log_uniform": {"low": 0.15, "high": 1.5},
    "tight": {"low": 0.15, "high": 0.5},
    "loose": {"low": 0.8, "high": 1.5},
    "bimodal": {"means": (0.3, 1.0), "stds": (0.05, 0.1), "weight": 0.5},
}


class BudgetError(ValueError):
    """A budget or budget distribution that cannot be used."""


def check_budget(budget_ms: float) -> float:
    if not isinstance(budget_ms, int | float) or not math.isfinite(budget_ms) or budget_ms <= 0:
        raise BudgetError(f"a budget must be a positive finite number of milliseconds, got {budget_ms!r}")
    return float(budget_ms)


@dataclass
class BudgetDistribution:
    kind: str
    params: dict = field(default_factory=dict)
    unit: str = "fraction"  # or "ms"
    trace: np.ndarray | None = None

    def sample(self, rng: np.random.Generator, n: int, full_ms: float) -> np.ndarray:
        """n budgets in milliseconds."""
        check_budget(full_ms)
        p = self.params
        if self.kind in ("uniform", "tight", "loose"):
            x = rng.uniform(p["low"], p["high"], n)
        elif self.kind == "log_uniform":
            x = np.exp(rng.uniform(math.log(p["low"]), math.log(p["high"]), n))
        elif self.kind == "bimodal":
            mode = (rng.random(n) >= p["weight"]).astype(int)
            x = rng.normal(np.take(p["means"], mode), np.take(p["stds"], mode))
            x = np.maximum(x, 0.05 * min(p["means"]))  # keep budgets positive
        elif self.kind == "trace":
            x = self.trace[rng.integers(len(self.trace), size=n)]
        else:
            raise BudgetError(f"unknown budget distribution {self.kind!r}")
        return x * full_ms if self.unit == "fraction" else x.astype(np.float64)

    @property
    def name(self) -> str:
        return self.kind if self.kind != "trace" else f"trace:{self.params['path']}"


def load_trace(path: str | Path) -> BudgetDistribution:
    path = Path(path)
    if not path.is_file():
        raise BudgetError(f"budget trace file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BudgetError(f"{path} is not JSON: {e}") from None
    unit = "ms"
    if isinstance(data, dict):
        unit, data = data.get("unit", "ms"), data.get("budgets")
        if unit not in ("ms", "fraction"):
            raise BudgetError(f"{path}: unit must be 'ms' or 'fraction', got {unit!r}")
    if not isinstance(data, list) or not data:
        raise BudgetError(f"{path} must hold a non-empty JSON list of budgets")
    for i, b in enumerate(data):
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b <= 0:
            raise BudgetError(f"{path}: budget #{i} is {b!r}; budgets must be positive finite numbers")
    return BudgetDistribution("trace", {"path": str(path)}, unit, np.asarray(data, dtype=np.float64))


def parse_distribution(spec: str) -> BudgetDistribution:
    """'uniform', 'tight', ..., or 'trace:FILE'."""
    if spec.startswith("trace:"):
        return load_trace(spec[len("trace:") :])
    if spec not in DEFAULTS:
        raise BudgetError(f"unknown budget distribution {spec!r}; choose from {sorted(DEFAULTS)} or trace:FILE")
    return BudgetDistribution(spec, dict(DEFAULTS[spec]))


N_BUDGET_FEATURES = 3  # what `budget_features` returns per budget


def budget_features(budget_ms: np.ndarray | float, full_ms: float) -> np.ndarray:
    """[log budget (ms), budget / full-config latency, log of that ratio]: log-scale and ratio, never squashed."""
    b = np.asarray(budget_ms, dtype=np.float64)
    ratio = b / full_ms
    return np.stack([np.log(b), ratio, np.log(ratio)], axis=-1).astype(np.float32)


PENALTY_KINDS = ("indicator", "relative")


@dataclass
class Penalty:
    """The budget-violation penalty: `indicator` = weight * [latency > budget]; `relative` = weight *
    max(0, latency / budget - 1). Works on scalars (returns a float) and on arrays (broadcasts)."""

    kind: str = "indicator"
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in PENALTY_KINDS:
            raise ValueError(f"unknown penalty {self.kind!r}; choose indicator or relative")
        if not np.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"penalty weight must be a finite number >= 0, got {self.weight}")

    def __call__(self, latency_ms, budget_ms):
        latency, budget = np.asarray(latency_ms, dtype=np.float64), np.asarray(budget_ms, dtype=np.float64)
        if self.kind == "indicator":
            p = self.weight * (latency > budget)
        else:
            p = self.weight * np.maximum(0.0, latency / budget - 1.0)
        return float(p) if np.ndim(p) == 0 else p
