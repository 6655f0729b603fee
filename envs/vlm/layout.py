"""How a request's views become image-marker tokens: the per-tile layout or Molmo's stitched one.

Every view (global view first, then the tiles row by row) is pooled into a side x side grid of
connector tokens. The layout decides which of them the LLM sees and in which order:
  per_tile: each view as its own block (`<im_start>`, side rows of side patches + `<im_col>`, `<im_end>`).
  molmo:    the global view as one block, then all tiles stitched into one block with the overlap
            margins trimmed (each tile keeps the pooled rows/cols its neighbours do not cover).
"""

from __future__ import annotations

import numpy as np

from envs.vlm.presets import VisionConfig


def tile_spans(n: int, cfg: VisionConfig) -> list[tuple[int, int]]:
    """(first pooled row, pooled rows kept) of each of `n` tiles along one axis, Molmo's trimming:
    the first tile keeps its leading margin, the last its trailing one, inner tiles neither."""
    p, m = cfg.patches_per_side, cfg.overlap_margin
    spans = []
    for i in range(n):
        patches = p - 2 * m + (m if i == 0 else 0) + (m if i == n - 1 else 0)
        spans.append((0 if i == 0 else m // 2, patches // 2))
    return spans


def stitched_shape(tiling: tuple[int, int], cfg: VisionConfig) -> tuple[int, int]:
    """Pooled rows x cols of the stitched tile block (Molmo layout)."""
    return tuple(sum(k for _, k in tile_spans(n, cfg)) for n in tiling)


def _blocks(tiling: tuple[int, int], n_views: int, cfg: VisionConfig) -> list[np.ndarray]:
    """The token blocks as 2-D arrays of pooled-token indices (view * side^2 + row * side + col)."""
    side = cfg.tokens_per_side
    per_view = side * side
    grid = np.arange(per_view).reshape(side, side)
    if cfg.layout == "per_tile":
        return [grid + v * per_view for v in range(n_views)]
    rows, cols = tiling
    if rows * cols + 1 != n_views or rows < 1:
        raise ValueError(f"the Molmo layout needs a global view and {rows} x {cols} tiles, got {n_views} views")
    rs, cs = tile_spans(rows, cfg), tile_spans(cols, cfg)
    stitched = np.block(
        [
            [(1 + i * cols + j) * per_view + grid[r0 : r0 + rh, c0 : c0 + cw] for j, (c0, cw) in enumerate(cs)]
            for i, (r0, rh) in enumerate(rs)
        ]
    )
    return [grid, stitched]


def image_tokens(
    tiling: tuple[int, int], n_views: int, cfg: VisionConfig, ids: dict[str, int]
) -> tuple[list[int], list[int], list[int]]:
    """(token ids, index in those ids of each image-patch token, pooled token each patch token carries)."""
    tokens, offsets, sources = [], [], []
    for block in _blocks(tiling, n_views, cfg):
        tokens.append(ids["im_start"])
        for row in block:
            offsets.extend(range(len(tokens), len(tokens) + len(row)))
            sources.extend(row.tolist())
            tokens.extend([ids["im_patch"]] * len(row))
            tokens.append(ids["im_col"])
        tokens.append(ids["im_end"])
    return tokens, offsets, sources


def image_token_count(tiling: tuple[int, int], cfg: VisionConfig) -> int:
    """How many image-marker tokens (patches, `<im_col>`, `<im_start>`, `<im_end>`) a request gets."""
    side = cfg.tokens_per_side
    block = 2 + side * (side + 1)
    if cfg.layout == "per_tile":
        return block * (1 + tiling[0] * tiling[1])
    h, w = stitched_shape(tiling, cfg)
    return block + 2 + h * (w + 1)
