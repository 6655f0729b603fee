"""TensorBoard curves of finished training episodes: accuracy, violations, latency, reward and knobs."""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from envs.vlm.presets import TIERS


class EpisodeLogger(BaseCallback):
    """Per rollout: the mean accuracy, violation rate, latency and reward of the episodes that finished,
    and histograms of the knobs they chose."""

    def __init__(self):
        super().__init__()
        self.buf: dict[str, list] = {k: [] for k in ("score", "violation", "latency", "reward", "tier", "k", "b")}

    def _on_step(self) -> bool:
        for info, done, reward in zip(self.locals["infos"], self.locals["dones"], self.locals["rewards"], strict=True):
            if done and "config" in info:
                c = info["config"]
                for key, val in (("score", info["score"]), ("violation", info["violation"]), ("reward", reward),
                                 ("latency", info["latency_ms"]), ("tier", list(TIERS).index(c.tier)),
                                 ("k", c.top_k), ("b", c.blocks)):  # fmt: skip
                    self.buf[key].append(float(val))
        return True

    def _on_rollout_end(self) -> None:
        if not self.buf["score"]:
            return
        for key, name in (("score", "accuracy"), ("violation", "violation_rate"), ("latency", "latency_ms"),
                          ("reward", "reward")):  # fmt: skip
            self.logger.record(f"episode/{name}", float(np.mean(self.buf[key])))
        for key in ("tier", "k", "b"):
            self.logger.record(f"knobs/{key}", torch.tensor(self.buf[key]))
        self.buf = {k: [] for k in self.buf}
