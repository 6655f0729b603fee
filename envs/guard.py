"""The budget guard: serve without the controller when, once it had run, no config could fit.

A controller costs time. For a budget between the cheapest config's latency and that plus the
controller's time, running the network guarantees a violation, while a cheap config served straight
away would fit. The guard reads the headroom the policy would (each config's predicted latency for
this request, controller time included, known before any vision work): if no config fits, it skips
the network and serves the config with the best expected reward with only the guard's own time
added: expected score minus the penalty (under the default indicator penalty of weight 1: the best
expected score among the configs that fit, and where none does, the best score, as the oracle
takes). The guard's time (the request's shapes, one prediction and comparison per config) is
charged instead of the controller's on the requests it serves.

It also repairs (`repair`, on unless turned off): when the controller's config is predicted not to fit
but another config it could still serve does (two-stage: the same tier, whose crops are encoded),
the best expected score among those is served instead. A network's decision boundary is never exact
near a budget's edge; the check is one comparison on the headroom already computed, so it runs
inside the controller's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.budgets import Penalty


@dataclass
class BudgetGuard:
    scores: np.ndarray  # [configs] expected score of each config (train-split means): the fallback's ranking
    ms: float  # the guard's own time, charged on the requests it serves
    penalty: Penalty = field(default_factory=Penalty)  # the reward's, which the fallback maximises
    repair: bool = True  # serve a config that fits instead of the controller's where it does not

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 1 or not np.isfinite(self.scores).all():
            raise ValueError("guard scores must be one finite expected score per config")
        if not np.isfinite(self.ms) or self.ms < 0:
            raise ValueError(f"the guard's time must be a finite number of ms >= 0, got {self.ms}")
        self.ms = float(self.ms)

    @classmethod
    def from_table(cls, table, ms: float, penalty: Penalty | None = None, repair: bool = True) -> BudgetGuard:
        """Expected scores from an outcome table's requests (use the train split's, never the test's)."""
        return cls(table.valid().score.mean(axis=0), ms, penalty or Penalty(), repair)

    @staticmethod
    def fires(headroom: np.ndarray) -> bool:
        """No config fits once the controller has run (`headroom` = log(budget / latency with it))."""
        return bool(np.max(headroom) < 0)

    def pick(self, predicted_ms: np.ndarray, budget_ms: float) -> int:
        """The fallback config: the best expected reward with the guard's time alone (ties: the first).
        `predicted_ms`: each config's predicted latency without any controller."""
        return int(np.argmax(self.scores - self.penalty(np.asarray(predicted_ms) + self.ms, budget_ms)))

    def repaired(self, cfg: int, headroom: np.ndarray, first: int = 0) -> int:
        """The config served for the controller's `cfg`: itself if it fits or repair is off; else, of
        the configs `first`, `first + 1`, ... whose headroom is given (two-stage: the chosen tier's),
        the one that fits with the best expected score (ties: the first); `cfg` if none fits. Fitting
        configs carry no penalty, so under any penalty this is the best expected reward among them."""
        headroom = np.asarray(headroom)
        if not self.repair or headroom[cfg - first] >= 0:
            return cfg
        fits = np.flatnonzero(headroom >= 0)
        return first + int(fits[np.argmax(self.scores[first + fits])]) if len(fits) else cfg
