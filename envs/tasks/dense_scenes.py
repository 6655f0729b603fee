"""Scenes packed with SynthVQA's objects, for the vision warm-up only.

A task scene holds 3 to 7 objects, so most vision tokens show nothing and one warm-up batch sees
only a few examples of each letter or digit. These scenes fill the canvas with the same objects at
the same sizes and colours as the task families (16 px capital letters, 40 pt digits, small, mid and large
shapes), so each image labels many more tokens through `dense_labels.token_targets`. They carry no
question: they never reach the LLM and never appear in a task split or outcome table.
"""

from __future__ import annotations

import numpy as np

from envs.tasks.data import Sample
from envs.tasks.synthvqa import (
    COLOURS,
    DIGIT_COLOURS,
    DIGIT_PT,
    GLYPH_COLOURS,
    GLYPH_PT,
    LETTERS,
    SHAPES,
    _pick,
    _Scene,
)

FAMILY = "dense"
FILL_TRIES = 60  # placements attempted after the large objects; most succeed on a 160 px canvas
KIND_WEIGHTS = {"letter": 0.45, "small_shape": 0.25, "mid_shape": 0.3}


def make_dense_sample(seed: int, index: int) -> Sample:
    """Image `index` of the dense scenes with `seed`: large objects first, then small ones until full."""
    rng = np.random.default_rng([seed, index, 1000])
    scene = _Scene(rng)
    if rng.random() < 0.3:
        scene.shape(_pick(rng, SHAPES), _pick(rng, COLOURS), rng.uniform(28, 40), tries=20)
    for _ in range(int(rng.integers(1, 4))):
        scene.text(str(int(rng.integers(10))), DIGIT_PT, _pick(rng, DIGIT_COLOURS), tries=20)
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    for _ in range(FILL_TRIES):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        if kind == "letter":
            scene.text(_pick(rng, LETTERS), GLYPH_PT, _pick(rng, GLYPH_COLOURS), tries=3)
        else:
            r = 5.0 if kind == "small_shape" else rng.uniform(7, 14)
            scene.shape(_pick(rng, SHAPES), _pick(rng, COLOURS), r, tries=3)
    return Sample(f"dense-{seed}-{index}", scene.image, "what is there?", [], FAMILY, tuple(scene.objects))
