"""Run a model on a dataset under many configs, sharing work between configs.

Per batch and tier the crops, vision encoder, connector and layers 0-2 run once; every
(top_k, blocks) pair then finishes from that prefix. Used by accuracy reports and outcome tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from envs.vlm.errors import InputError
from envs.vlm.metrics import exact_match, vqa_soft_accuracy
from envs.vlm.model import Preprocessed


@dataclass(frozen=True)
class Config:
    tier: str
    top_k: int
    blocks: int


def all_configs(model) -> list[Config]:
    k = model.cfg.knob_lists()
    return [Config(*c) for c in itertools.product(k["tier"], k["top_k"], k["blocks"])]


def finish_all(model, samples: Sequence, configs: Sequence[Config], batch_size: int = 32, progress: bool = False):
    """Yield (config index, sample indices, prepared batch, generation) for every batch and config.

    Per batch and tier, preprocessing, vision, connector and layers 0-2 run once. A sample whose
    image or question is bad is reported once as (None, [index], error, None) and skipped.
    """
    by_tier: dict[str, list[int]] = {}
    for j, cfg in enumerate(configs):
        model.check_knobs(cfg.tier, cfg.top_k, cfg.blocks)
        by_tier.setdefault(cfg.tier, []).append(j)
    failed: set[int] = set()
    batches = [(t, i) for t in by_tier for i in range(0, len(samples), batch_size)]
    for tier, start in tqdm(batches, desc="sweep", disable=not progress, leave=False):
        good, pres = [], []
        for i in range(start, min(start + batch_size, len(samples))):
            if i in failed:
                continue
            try:
                pres.append(model.preprocess([samples[i].image], [samples[i].question], tier))
                good.append(i)
            except InputError as e:
                failed.add(i)
                yield None, [i], e, None
        if not good:
            continue
        pre = Preprocessed.merge(pres)
        with torch.no_grad():
            prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        state = model.prefix(prepared)
        for j in by_tier[tier]:
            yield j, good, prepared, model.finish(state, configs[j].top_k, configs[j].blocks)


def sweep(model, samples: Sequence, configs: Sequence[Config], batch_size: int = 32, progress: bool = True):
    """Return (answers [n][c] as str, exact match [n, c], VQA accuracy [n, c]); failed samples score 0."""
    n, c = len(samples), len(configs)
    answers = [[""] * c for _ in range(n)]
    em, vqa = np.zeros((n, c), np.float32), np.zeros((n, c), np.float32)
    for j, idx, _, gen in finish_all(model, samples, configs, batch_size, progress):
        if j is None:
            continue
        for i, a in zip(idx, gen.answers, strict=True):
            answers[i][j] = a
            em[i, j] = exact_match(a, samples[i].answers)
            vqa[i, j] = vqa_soft_accuracy(a, samples[i].answers)
    return answers, em, vqa


def accuracy_table(families: Sequence[str], configs: Sequence[Config], scores: np.ndarray) -> list[dict]:
    """One row per config: accuracy overall and by family (`families[i]` is sample i's)."""
    fam_idx = {f: np.array([x == f for x in families]) for f in sorted(set(families))}
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
