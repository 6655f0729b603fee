"""Checkpoint selection on the validation split: keep PPO's parameters only where they beat the BC start.

PPO's last update is not always its best, and a gain within validation noise is not a gain: a check
replaces the behaviour-cloned start only with a paired gain of several standard errors.
"""

from __future__ import annotations

import statistics

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from agents.evaluation import clustered_se


def gain_threshold(alpha: float, checks: int) -> float:
    """Paired standard errors a check's validation gain must reach so that, when no check truly gains,
    the chance that any of `checks` replaces the start stays below `alpha` (one-sided, Bonferroni: the
    checks are correlated, so this errs towards keeping the start)."""
    return statistics.NormalDist().inv_cdf(1.0 - alpha / max(1, checks))


class KeepBestOnValidation(BaseCallback):
    """Scores the policy on held-out requests every `every` steps and restores the best parameters at
    the end. `score(model)` gives the rewards per budget distribution on fixed episodes,
    [distributions, episodes] (or their means, [distributions]), optionally with each episode's request,
    `(rewards, requests)`. A check is a candidate only if it is not below the behaviour-cloned start (the
    first check, always a candidate) on any distribution and, given episodes, its mean gain over the
    start, paired episode by episode, is at least `min_gain_se` standard errors (clustered by request
    where given: episodes of one request are not independent). The candidate with the best mean is
    kept: fine-tuning cannot end below its start on validation, nor away from it by chance."""

    def __init__(self, score, every: int, min_gain_se: float = 2.0):
        super().__init__()
        self.score, self.every, self.min_gain_se, self.last = score, every, min_gain_se, 0
        self.history: list[tuple[int, float, bool]] = []  # (step, mean reward, candidate)
        self.start: np.ndarray | None = None
        self.best, self.best_step, self.best_state = -np.inf, 0, None

    def _check(self) -> None:
        out = self.score(self.model)
        rewards, requests = out if isinstance(out, tuple) else (out, None)
        rewards = np.asarray(rewards, dtype=np.float64)
        rewards = rewards.reshape(-1, 1) if rewards.ndim < 2 else rewards  # [distributions, episodes]
        self.start = rewards if self.start is None else self.start
        gain = (rewards - self.start).ravel()
        clusters = np.arange(gain.size) if requests is None else np.asarray(requests).ravel()
        se = clustered_se(gain, clusters) if rewards.shape[1] > 1 else 0.0
        means = rewards.mean(axis=1)
        reward = float(means.mean())
        candidate = bool((means >= self.start.mean(axis=1)).all() and gain.mean() >= self.min_gain_se * se)
        self.history.append((self.num_timesteps, reward, candidate))
        self.logger.record("val/mean_reward", reward)
        if candidate and reward > self.best:
            self.best, self.best_step = reward, self.num_timesteps
            self.best_state = {k: v.detach().clone() for k, v in self.model.policy.state_dict().items()}

    def _on_training_start(self) -> None:
        self._check()

    def _on_rollout_end(self) -> None:
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            self._check()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.history[-1][0] != self.num_timesteps:
            self._check()
        self.model.policy.load_state_dict(self.best_state)
