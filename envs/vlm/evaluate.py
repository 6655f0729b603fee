"""Score a model on a dataset under many configs, sharing work between configs.

Per batch and tier the crops, vision encoder, connector and layers 0-2 run once; every
(top_k, blocks) pair then finishes from that prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from envs.tasks.metrics import exact_match, vqa_soft_accuracy


@dataclass(frozen=True)
class Config:
    tier: str
    top_k: int
    blocks: int


def all_configs(model) -> list[Config]:
    k = model.cfg.knob_lists()
    return [Config(*c) for c in itertools.product(k["tier"], k["top_k"], k["blocks"])]


def sweep(model, samples: Sequence, configs: Sequence[Config], batch_size: int = 32, progress: bool = True):
    """Return (answers [n][c] as str, exact match [n, c], VQA accuracy [n, c])."""
    n, c = len(samples), len(configs)
    answers = [[""] * c for _ in range(n)]
    em, vqa = np.zeros((n, c), np.float32), np.zeros((n, c), np.float32)
    by_tier: dict[str, list[int]] = {}
    for j, cfg in enumerate(configs):
        model.check_knobs(cfg.tier, cfg.top_k, cfg.blocks)
        by_tier.setdefault(cfg.tier, []).append(j)
    batches = [(t, i) for t in by_tier for i in range(0, n, batch_size)]
    for tier, start in tqdm(batches, desc="sweep", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        state = model.prefix(model.prepare([s.image for s in chunk], [s.question for s in chunk], tier))
        for j in by_tier[tier]:
            gen = model.finish(state, configs[j].top_k, configs[j].blocks)
            for i, (s, a) in enumerate(zip(chunk, gen.answers, strict=True)):
                answers[start + i][j] = a
                em[start + i, j] = exact_match(a, s.answers)
                vqa[start + i, j] = vqa_soft_accuracy(a, s.answers)
    return answers, em, vqa


def accuracy_table(samples: Sequence, configs: Sequence[Config], scores: np.ndarray) -> list[dict]:
    """One row per config: accuracy overall and by family."""
    families = sorted({s.family for s in samples})
    fam_idx = {f: np.array([s.family == f for s in samples]) for f in families}
    rows = []
    for j, cfg in enumerate(configs):
        rows.append(
            {
                "tier": cfg.tier, "top_k": cfg.top_k, "blocks": cfg.blocks,
                "accuracy": float(scores[:, j].mean()),
                "by_family": {f: float(scores[m, j].mean()) for f, m in fam_idx.items()},
            }
        )  # fmt: skip
    return rows
