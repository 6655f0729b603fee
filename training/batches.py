"""What each training step sees: its knobs, its scenes, their crops and tokens, and every target.

A step's inputs are a pure function of (args, step), so a resumed run replays exactly and
`--workers` processes can make the next steps' inputs while the current one trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from envs.tasks.dense_scenes import make_dense_sample
from envs.tasks.synthvqa import FAMILIES, SPLIT_SEEDS, complement, make_sample
from envs.vlm.model import Preprocessed
from envs.vlm.presets import FIRST_KNOBBED_LAYER, TIERS
from training.aids import active_aids
from training.vision_probe import prepare_with_targets

DENSE_AUX_OFFSET = 10_000_000  # dense-scene indices of joint steps, apart from the warm-up's


def sample_knobs(rng: np.random.Generator, cfg, args, step: int = 0) -> tuple[str, int, list[int]]:
    """A step's (tier, top-k, layers run). The first `full_steps`, and a `p_full` share after them, run
    the full config (progressive shrinking, then the "sandwich" rule of slimmable networks); the
    others a random top-k and a random subset of the knobbed layers of a size the preset offers
    (LayerDrop-style), so every config stays usable whatever the block ranking picks later."""
    n_layers = cfg.llm.layers
    w = np.array(args.tier_weights, dtype=np.float64)
    tier = TIERS[int(rng.choice(len(TIERS), p=w / w.sum()))]
    if step < args.full_steps or rng.random() < args.p_full:
        return tier, cfg.llm.top_k, list(range(n_layers))
    top_k = int(rng.choice(cfg.knobs.top_k))
    blocks = int(rng.choice(cfg.knobs.blocks))
    kept = sorted(rng.choice(np.arange(FIRST_KNOBBED_LAYER, n_layers), size=blocks, replace=False).tolist())
    return tier, top_k, list(range(FIRST_KNOBBED_LAYER)) + kept


def family_mix(weights: tuple[float, ...]):
    """A `make(seed, index)` drawing each sample's family with these weights (FAMILIES order).

    Equal weights keep `make_sample`'s cycle (a balanced batch, as every split has). Unequal ones
    spend more of the batch on families still being learned: a glyph question is only answerable
    at the high tier, so a balanced batch holds about two useful ones.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(FAMILIES),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"family_weights needs {len(FAMILIES)} non-negative weights ({', '.join(FAMILIES)}), got {weights}"
        )
    if np.all(w == w[0]):
        return make_sample

    def make(seed: int, index: int):
        family = FAMILIES[int(np.random.default_rng([seed, index, 77]).choice(len(w), p=w / w.sum()))]
        return make_sample(seed, index, family)

    return make


def task_batch(make, seed: int, step: int, size: int, pairs: str = "none") -> list:
    """`size` samples of step `step`; with `pairs` other than "none" (a `synthvqa.complement` mode),
    each complementable sample is followed by its complement."""
    batch, i = [], 0
    while len(batch) < size:
        sample = make(seed, step * size + i)
        batch.append(sample)
        i += 1
        other = complement(sample, pairs) if pairs != "none" and len(batch) < size else None
        if other is not None:
            batch.append(other)
    return batch


@dataclass
class StepInputs:
    """The host's part of one training step: its knobs, scenes, crops, tokens and vision-token targets."""

    tier: str
    top_k: int
    layers: list[int]
    pre: Preprocessed
    targets: tuple[np.ndarray, np.ndarray]
    dense_pre: Preprocessed | None  # the dense scenes of a joint step's vision loss
    dense_targets: tuple[np.ndarray, np.ndarray] | None
    aid_targets: list[Any] = field(default_factory=list)  # per active aid (`active_aids` order); empty in warm-up


class StepMaker(Dataset):
    """Step `i`'s inputs, a pure function of (args, i). Rendering and cropping run on the host
    (`benchmarks/train_inputs.py` times them); `--workers` makes them in a `DataLoader` over step
    indices, off the critical path of an accelerator's step."""

    def __init__(self, args, cfg, tokenizer):
        self.args, self.cfg, self.tokenizer = args, cfg, tokenizer
        self.task_sample = family_mix(args.family_weights)
        self.aids = active_aids(args)

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int) -> StepInputs:
        args, seed = self.args, SPLIT_SEEDS["train"]
        rng = np.random.default_rng([args.seed, step])  # knobs depend on the step only: resumes replay exactly
        tier, top_k, layers = sample_knobs(rng, self.cfg, args, step)
        warm_up = step < args.vision_steps
        make = make_dense_sample if warm_up and args.warmup_scenes == "dense" else self.task_sample
        batch = task_batch(make, seed, step, args.batch_size, "none" if warm_up else args.complement_pairs)
        pre, targets = prepare_with_targets(
            self.cfg, self.tokenizer, batch, tier, None if warm_up else [s.answer for s in batch]
        )
        dense_pre = dense_targets = None
        if not warm_up and args.dense_aux_batch > 0:
            # task scenes show one small letter per glyph question: without these the letter features fade
            first = DENSE_AUX_OFFSET + step * args.dense_aux_batch
            dense_pre, dense_targets = prepare_with_targets(
                self.cfg,
                self.tokenizer,
                [make_dense_sample(seed, first + i) for i in range(args.dense_aux_batch)],
                tier,
            )
        side = self.cfg.vision.tokens_per_side
        aid_targets = [] if warm_up else [aid.targets(args, batch, pre, self.tokenizer, side) for aid in self.aids]
        return StepInputs(tier, top_k, layers, pre, targets, dense_pre, dense_targets, aid_targets)


def _as_made(item):
    return item


def step_inputs(maker: StepMaker, start: int, end: int, workers: int):
    """Inputs of steps start..end-1 in order: made here, or by `workers` processes a few steps ahead."""
    if workers == 0:
        return (maker[step] for step in range(start, end))
    loader = DataLoader(
        maker, batch_size=None, sampler=range(start, end), num_workers=workers, collate_fn=_as_made, prefetch_factor=4
    )
    return iter(loader)
