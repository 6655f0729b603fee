"""Molmo-style image preprocessing: a global view plus overlapping tiled crops.

The tier knob sets `max_crops`; the tiling rule (Molmo's `select_tiling`) picks rows x cols with
rows*cols <= max_crops that covers the image with the least upscaling, or failing that the least
downscaling. Tiled crops overlap by `overlap_margin` patches on each side. Padding is tracked per
patch so the connector can add Molmo's pad embeddings.

A Molmo-layout config (`VisionConfig.layout == "molmo"`) follows Molmo's preprocessor exactly: float32
bilinear resize with antialias and `int()` sizes, and its mask convention - view k carries the padding
mask of view k + 1 (the global view gets the first tile's) and the last tile a row of -1.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from envs.vlm.errors import InputError
from envs.vlm.presets import VisionConfig


@dataclass
class Crops:
    pixels: np.ndarray  # [n, 3, S, S] float32, normalised; index 0 is the global view
    patch_mask: np.ndarray  # [n, P, P] float32: fraction of each patch that is image (Molmo layout: see above)
    tiling: tuple[int, int]  # (rows, cols) of tiled crops; (0, 0) for the global view only
    regions: np.ndarray  # [n, 4] float64: (top, left, bottom, right) each view covers, in source-image pixels

    @property
    def n_crops(self) -> int:
        return self.pixels.shape[0]


MAX_PIXELS = int(os.environ.get("KNOB_RL_MAX_PIXELS", 64_000_000))
"""Largest image (width x height) `load_image` accepts; larger ones are an InputError naming the file and
its size. Settable per call (`max_pixels`) or for a run (environment variable KNOB_RL_MAX_PIXELS)."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any PIL mode.

    - 16-bit greyscale (I;16, I;16B, I;16L, I;16N, and I, which is how PIL opens 16-bit PNGs and TIFFs):
      0..65535 scaled by 1/257 (rounded), so 65535 is 255; PIL's own conversion clips to 255 instead,
      turning a 16-bit image white.
    - 32-bit float (F): read as [0, 1] when its largest finite value is at most 1, else as [0, 255];
      clipped to that range, NaN as 0.
    - With transparency (RGBA, LA, PA, premultiplied La/RGBa, P or L/RGB with a transparency entry):
      composited on white, as a viewer shows a transparent document.
    - 1, L, P, CMYK, YCbCr, LAB, HSV: PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()  # a caller's image (or a file's, closed after) is never handed out itself
    if mode in _SIXTEEN_BIT:
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=0.0)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(np.clip(a * scale, 0, 255)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in _ALPHA or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return img.convert("RGB")


def _check_size(width: int, height: int, where: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            f"{where} is {width} x {height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} (raise it with KNOB_RL_MAX_PIXELS, or shrink the image)"
        )


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """Accept a PIL image, an HxWx3 uint8 array or a path as 8-bit RGB (`to_rgb`); an image over
    `max_pixels` (default MAX_PIXELS) or anything else unusable is a clear InputError."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        _check_size(*image.size, "the image", limit)
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        _check_size(image.shape[1], image.shape[0], "the image array", limit)
        return Image.fromarray(image)
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                _check_size(*img.size, str(path), limit)  # from the header, before decoding
                img.load()
                return to_rgb(img)
        except Image.DecompressionBombError as e:
            raise InputError(f"{path} is too large to read: {e}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read {path} as an image: {e}") from None
    raise InputError(f"unsupported image type {type(image).__name__}")


@functools.lru_cache(maxsize=4096)  # a pure function of four ints, asked again for every request
def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """Molmo's rule: cover the image at native size with the fewest pixels, else shrink least."""
    tilings = [(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops]
    sizes = np.array(tilings, dtype=np.float64) * window
    scale = np.min(sizes / np.array([height, width], dtype=np.float64), axis=1)
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]
    scale[scale < 1] = np.inf
    return tilings[int(np.argmin(scale))]


def resize_and_pad(img: Image.Image, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit `img` into height x width keeping its aspect ratio, centred.

    Returns uint8 pixels, a 0/1 uint8 image mask, and the (scale_y, scale_x, top, left) placing source
    pixel (y, x) at (top + y * scale_y, left + x * scale_x) of the output.
    """
    scale = min(height / img.height, width / img.width)
    h, w = max(1, round(img.height * scale)), max(1, round(img.width * scale))
    resized = img if (w, h) == img.size else img.resize((w, h), Image.BILINEAR)
    top, left = (height - h) // 2, (width - w) // 2
    out = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    out[top : top + h, left : left + w] = np.asarray(resized)
    mask[top : top + h, left : left + w] = 1
    return out, mask, np.array([h / img.height, w / img.width, top, left])


def molmo_resize_and_pad(
    img: Image.Image, height: int, width: int, mean, std
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Molmo's resize: [0, 1] float32 pixels resized bilinearly with antialias to `int()` sizes
    computed in float32, clipped, centred on zeros, then normalised. Returns normalised HxWx3 float32
    pixels, a 0/1 uint8 image mask and the placement (as `resize_and_pad`)."""
    scale = min(np.float32(height) / np.float32(img.height), np.float32(width) / np.float32(img.width))
    h, w = max(1, int(np.float32(img.height) * scale)), max(1, int(np.float32(img.width) * scale))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32) / 255.0
    if (h, w) != (img.height, img.width):
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    top, left = (height - h) // 2, (width - w) // 2
    out = np.zeros((height, width, 3), dtype=np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)
    out[top : top + h, left : left + w] = x
    mask[top : top + h, left : left + w] = 1
    out = (out - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return out, mask, np.array([h / img.height, w / img.width, top, left])


@functools.lru_cache(maxsize=8)
def level_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: each channel's normalised value of every uint8 level.

    Computed as (level / 255 - mean) / std in float32, so a lookup gives the very values that
    normalising float32 views gives, in one pass instead of several (benchmarks/preprocess.py)."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    table = (levels[None, :] - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]
    table.flags.writeable = False  # cached and shared by every call
    return table


def _region(placement: np.ndarray, y: float, x: float, size: int) -> list[float]:
    """The source-image box that output pixels [y, y+size) x [x, x+size) show."""
    sy, sx, top, left = placement
    return [(y - top) / sy, (x - left) / sx, (y + size - top) / sy, (x + size - left) / sx]


def tiling_for(height: int, width: int, max_crops: int, cfg: VisionConfig) -> tuple[int, int]:
    """The (rows, cols) of tiled crops an image of this size gets; (0, 0) for the global view only."""
    if max_crops <= 0:
        return (0, 0)
    margin = cfg.overlap_margin * cfg.patch_size
    return select_tiling(height - 2 * margin, width - 2 * margin, cfg.crop_size - 2 * margin, max_crops)


def image_size(image) -> tuple[int, int]:
    """(height, width) without decoding pixels where the input allows (arrays, PIL images)."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image.shape[0], image.shape[1]
    if isinstance(image, Image.Image):
        return image.height, image.width
    img = load_image(image)  # paths, and clear errors for anything else
    return img.height, img.width


def make_crops(image, max_crops: int, cfg: VisionConfig) -> Crops:
    img = load_image(image)
    if img.width < 1 or img.height < 1:
        raise InputError("the image is empty")
    if cfg.layout == "molmo":
        return _molmo_crops(img, max_crops, cfg)
    size = cfg.crop_size
    pixels, mask, placement = resize_and_pad(img, size, size)
    views, regions = [(pixels, mask)], [_region(placement, 0, 0, size)]
    tiling = tiling_for(img.height, img.width, max_crops, cfg)
    if max_crops > 0:
        tiles, tile_regions = _tiles(resize_and_pad, img, tiling, cfg)
        views, regions = views + tiles, regions + tile_regions
    n = len(views)
    table = level_table(tuple(cfg.mean), tuple(cfg.std))
    pixels = np.empty((n, 3, size, size), dtype=np.float32)
    for v, (view, _) in enumerate(views):
        for c in range(3):
            np.take(table[c], view[:, :, c], out=pixels[v, c])
    return Crops(pixels, _coverage([m for _, m in views], cfg), tiling, np.array(regions))


def _tiles(resize, img: Image.Image, tiling: tuple[int, int], cfg: VisionConfig) -> tuple[list, list]:
    """The tiled crops, row by row, cut from one `resize(img, height, width)` (as `resize_and_pad`) of the
    image to the tiling's size: their (pixels, mask) pairs and the regions they cover."""
    size, margin = cfg.crop_size, cfg.overlap_margin * cfg.patch_size
    window = size - 2 * margin
    big, big_mask, placement = resize(img, tiling[0] * window + 2 * margin, tiling[1] * window + 2 * margin)
    views, regions = [], []
    for i in range(tiling[0]):
        for j in range(tiling[1]):
            y, x = i * window, j * window
            views.append((big[y : y + size, x : x + size], big_mask[y : y + size, x : x + size]))
            regions.append(_region(placement, y, x, size))
    return views, regions


def _coverage(masks: list[np.ndarray], cfg: VisionConfig) -> np.ndarray:
    """[n, P, P] float32: the fraction of each patch of each view's 0/1 pixel mask that is image."""
    p, patch = cfg.patches_per_side, cfg.patch_size
    covered = np.stack(masks).reshape(len(masks), p, patch, p, patch).sum(axis=(2, 4), dtype=np.int32)
    return covered.astype(np.float32) / np.float32(patch * patch)


def _molmo_crops(img: Image.Image, max_crops: int, cfg: VisionConfig) -> Crops:
    """Molmo's views: the global view, then the tiles row by row; Molmo's masks (see module doc)."""
    if max_crops < 1:
        raise InputError(f"a Molmo-layout model needs max_crops >= 1, got {max_crops}")
    size, p = cfg.crop_size, cfg.patches_per_side
    resize = functools.partial(molmo_resize_and_pad, mean=cfg.mean, std=cfg.std)
    glob, _, placement = resize(img, size, size)
    tiling = tiling_for(img.height, img.width, max_crops, cfg)
    tiles, regions = _tiles(resize, img, tiling, cfg)
    patch_mask = np.concatenate([_coverage([m for _, m in tiles], cfg), np.full((1, p, p), -1.0, dtype=np.float32)])
    pixels = np.ascontiguousarray(np.stack([glob] + [t for t, _ in tiles]).transpose(0, 3, 1, 2))
    return Crops(pixels, patch_mask, tiling, np.array([_region(placement, 0, 0, size)] + regions))
