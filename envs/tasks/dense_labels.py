"""Per-vision-token targets from SynthVQA's scene annotations: dense auxiliary supervision.

A VQA loss gives one answer token of signal per image, passed back through every LLM layer, so a
from-scratch vision encoder learns slowly. Since the generator knows what it drew where, each
pooled vision token can also be told what it shows (object class and colour): a detection-style
auxiliary loss on the connector output. Targets follow the crop geometry, so a token is only
asked about an object that is legible at its crop's scale; an illegible one is ignored rather
than called "none", which keeps the tier knob meaningful (16 px capitals are asked about at the
high tier, and at the medium tier only the wide M and W; 10 px shapes from the medium tier up).
"""

from __future__ import annotations

import numpy as np

from envs.tasks.synthvqa import COLOURS, LETTERS, SHAPES, SceneObject
from envs.vlm.crops import Crops

IGNORE = -100
CLASSES = (
    "none",
    *(f"shape:{s}" for s in SHAPES),
    *(f"letter:{c}" for c in LETTERS),
    *(f"digit:{d}" for d in range(10)),
)
COLOUR_CLASSES = ("none", *COLOURS)
MIN_LEGIBLE_PX = 6.0  # an object smaller than this on the crop's pixels is not asked about
MIN_LEGIBLE_LETTER_PX = 13.0  # most of a 16 px token: capitals at native size; at 0.7x (medium) only M and W


def _min_px(o: SceneObject, min_px: float) -> float:
    return max(min_px, MIN_LEGIBLE_LETTER_PX) if o.label.startswith("letter:") else min_px


def token_targets(
    objects: tuple[SceneObject, ...], crops: Crops, tokens_per_side: int, min_px: float = MIN_LEGIBLE_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Class and colour ids [n_crops * tokens_per_side**2] in the connector's token order.

    A token shows the largest object whose centre lies in it (class and colour); failing that, the
    colour of the largest object whose extent covers the token's centre (class IGNORE: the token
    sees a patch of colour); failing that, nothing ("none"). A token whose object (or any object
    centred in it) is below `min_px` on this crop is IGNORE for both.
    """
    n = crops.n_crops
    cls = np.zeros((n, tokens_per_side, tokens_per_side), dtype=np.int64)
    col = np.zeros_like(cls)
    crop_px = crops.pixels.shape[-1]
    for v, (top, left, bottom, right) in enumerate(crops.regions):
        scale = crop_px / (bottom - top)  # crop pixels per source pixel
        th, tw = (bottom - top) / tokens_per_side, (right - left) / tokens_per_side
        for i in range(tokens_per_side):
            for j in range(tokens_per_side):
                y0, x0 = top + i * th, left + j * tw
                centred = [o for o in objects if y0 <= o.cy < y0 + th and x0 <= o.cx < x0 + tw]
                yc, xc = y0 + th / 2, x0 + tw / 2
                covering = [o for o in objects if abs(o.cy - yc) <= o.size / 2 and abs(o.cx - xc) <= o.size / 2]
                if any(o.size * scale < _min_px(o, min_px) for o in centred):
                    cls[v, i, j] = col[v, i, j] = IGNORE
                    continue
                chosen = max(centred or covering, key=lambda o: o.size, default=None)
                if chosen is None:
                    continue
                if chosen.size * scale < _min_px(chosen, min_px):
                    cls[v, i, j] = col[v, i, j] = IGNORE
                    continue
                col[v, i, j] = COLOUR_CLASSES.index(chosen.colour)
                # a token inside a large object sees a patch of colour: its class is asked where the centre is
                cls[v, i, j] = CLASSES.index(chosen.label) if centred else IGNORE
    return cls.reshape(-1), col.reshape(-1)


def object_token_mask(
    objects: tuple[SceneObject, ...], crops: Crops, tokens_per_side: int, min_px: float = MIN_LEGIBLE_PX
) -> np.ndarray:
    """Bool [n_crops * tokens_per_side**2]: the vision tokens that show one of `objects` (its centre or
    its extent, where it is legible on that crop), in the connector's token order."""
    _, colour = token_targets(tuple(objects), crops, tokens_per_side, min_px)
    return colour > 0
